"""``python manage.py runscheduler``: scheduling passes in a foreground loop.

The loop reads like a story: heartbeat, sweep when due, run a pass when woken,
then wait. A Postgres ``LISTEN scheduler_wake`` wakes it at once when a task is
submitted, finishes or is cancelled (``scheduling.triggers.request_pass``);
otherwise it wakes every ``poll_interval_ms`` and runs a pass only if tasks are
waiting. SIGTERM (or Ctrl-C) lets the current pass finish, then exits 0.
Several runschedulers (and django-q workers) may run at once: their passes
serialise on the scheduler row lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connection
from django.db.models.functions import Now

from portal.models import ControlPlaneServer
from scheduling import triggers
from scheduling.choices import TaskStatus
from scheduling.models import Task
from scheduling.passes import PassResult, run_pass
from scheduling.sweep import sweep

log = logging.getLogger("scheduling.runscheduler")

# Waits are cut into slices this long so SIGTERM is noticed even with a long poll interval.
_WAIT_SLICE_S = 0.25


class Command(BaseCommand):
    help = "Run scheduling passes in a foreground loop, woken by LISTEN/NOTIFY (SIGTERM finishes the pass, exits)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--once", action="store_true", help="sweep, run one pass and exit")
        parser.add_argument("--poll-interval-ms", type=int, default=None,
                            help="idle wait between checks (default: scheduler.poll_interval_ms)")
        parser.add_argument("--sweep-interval-s", type=float, default=1.0, help="how often to sweep (default 1)")

    def on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            log.info("received %s, finishing the current pass", signal.Signals(signum).name)
        self.stop_requested = True

    def handle(self, *args, once: bool, poll_interval_ms: int | None, sweep_interval_s: float, **options) -> None:
        self.stop_requested = False
        self.poll_s = (poll_interval_ms or settings.SCHEDULER.poll_interval_ms) / 1000
        self.sweep_interval_s = sweep_interval_s
        self.name = f"{socket.gethostname()}:{os.getpid()}:scheduler"
        self.passes = 0
        self.last_logged: tuple[int, int, int] | None = None
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

        # Name our database sessions so operators can tell them apart in pg_stat_activity.
        connection.close()
        options_ = connection.settings_dict.setdefault("OPTIONS", {})
        options_["application_name"] = os.environ.get("PORTAL_PROCESS_NAME") or "gpu-portal-scheduler"

        if once:
            self.sweep_step()
            self.pass_step()
            return

        self.listener: psycopg.Connection | None = None
        self.listen()
        log.info("runscheduler %s ready (poll %d ms, sweep every %.1f s)", self.name, self.poll_s * 1000,
                 self.sweep_interval_s)
        next_heartbeat = next_sweep = 0.0
        woken = True  # a first pass at start catches up on anything missed while down
        while not self.stop_requested:
            now = time.monotonic()
            if now >= next_heartbeat:
                self.heartbeat_step()
                next_heartbeat = now + settings.SCHEDULER.heartbeat_interval_s
            if now >= next_sweep:
                woken = self.sweep_step() or woken
                next_sweep = now + self.sweep_interval_s
            if woken or self.work_waiting():
                self.pass_step()
            if self.stop_requested:
                break
            woken = self.wait_step()
        if self.listener is not None:
            self.listener.close()
        log.info("runscheduler %s stopped after %d pass(es)", self.name, self.passes)

    # --- steps: each returns True when there is more to do ------------------------

    def pass_step(self) -> bool:
        try:
            result = run_pass(actor="scheduler")
        except Exception:
            # A failed pass rolled back as a whole; the next wake-up or poll retries it.
            log.exception("scheduler pass failed")
            connection.close_if_unusable_or_obsolete()
            return False
        self.passes += 1
        self.log_pass(result)
        return result.placements > 0

    def sweep_step(self) -> bool:
        try:
            result = sweep(actor="sweep")
        except Exception:
            log.exception("sweep failed")
            connection.close_if_unusable_or_obsolete()
            return False
        return bool(result)

    def heartbeat_step(self) -> bool:
        try:
            ControlPlaneServer.objects.update_or_create(
                name=self.name,
                defaults={"role": ControlPlaneServer.Role.SCHEDULER, "hostname": socket.gethostname(),
                          "pid": os.getpid(), "last_seen_at": Now(), "info": {"passes": self.passes}},
            )
        except Exception:
            log.exception("heartbeat failed")
            connection.close_if_unusable_or_obsolete()
        return False

    def work_waiting(self) -> bool:
        """Without a wake-up, run a pass only if tasks are waiting (GPUs may have freed up)."""
        try:
            return Task.objects.filter(status=TaskStatus.PENDING).exists()
        except Exception:
            connection.close_if_unusable_or_obsolete()
            return False

    def wait_step(self) -> bool:
        """Wait up to the poll interval for a NOTIFY; True if woken by one."""
        deadline = time.monotonic() + self.poll_s
        while not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                if self.listener is None:
                    self.listen()
                    return True  # wake-ups may have been missed while disconnected
                woken = any(True for _ in self.listener.notifies(timeout=min(remaining, _WAIT_SLICE_S),
                                                                  stop_after=1))
                if woken:
                    # Everything that arrived meanwhile is served by the same pass.
                    for _ in self.listener.notifies(timeout=0):
                        pass
                    return True
            except psycopg.Error:
                log.warning("lost the LISTEN connection; reconnecting")
                self.close_listener()
                time.sleep(min(remaining, 1.0))
        return False

    # --- helpers -----------------------------------------------------------------

    def listen(self) -> None:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        try:
            self.listener = psycopg.connect(**params, autocommit=True)
            self.listener.execute(f"LISTEN {triggers.WAKE_CHANNEL}")
        except psycopg.Error as exc:
            log.warning("cannot LISTEN for wake-ups (%s); polling only", exc)
            self.close_listener()

    def close_listener(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(psycopg.Error):
                self.listener.close()
        self.listener = None

    def log_pass(self, result: PassResult) -> None:
        key = (result.placements, result.preemptions, result.pending)
        # Identical idle passes (nothing placed, same queue) are logged once, then at debug level.
        level = logging.DEBUG if key == self.last_logged and not result.placements else logging.INFO
        self.last_logged = key
        log.log(level, "pass: %s", result)
