"""``python manage.py runscheduler``: scheduling passes in a foreground loop.

The loop reads like a story: run a pass when woken, heartbeat and sweep when
due, then wait. A Postgres ``LISTEN scheduler_wake`` wakes it at once when a task is
submitted, finishes or is cancelled (``scheduling.triggers.request_pass``);
otherwise it wakes every ``poll_interval_ms`` and runs a pass only if tasks are
waiting, backing off (doubling up to ``--max-idle-pass-interval-s``) while such
passes place nothing. SIGTERM (or Ctrl-C) lets the current pass finish, then exits 0.
While the database is unreachable (a restart, a failover, a network cut) every step
stops: the loop probes it with exponential backoff (``--max-db-backoff-s``), logs
once when it goes and once when it is back, then runs a pass at once.
Several runschedulers (and django-q workers) may run at once: their passes
serialise on the scheduler row lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from kernel import control_plane, registry
from kernel.models import ControlPlaneServer
from scheduling import history, triggers, usage
from scheduling.choices import TaskStatus
from scheduling.models import Task
from scheduling.passes import PassResult, run_pass
from scheduling.sweep import sweep

log = logging.getLogger("scheduling.runscheduler")

# Waits are cut into slices this long so SIGTERM is noticed even with a long poll interval.
_WAIT_SLICE_S = 0.25
# The usage ledger's upkeep (one utilisation sample per GPU, the roll-up) once a minute.
USAGE_INTERVAL_S = 60.0


# Errors that mean "the database is away", not "this pass has a bug".
_DB_UNAVAILABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
_DB_BACKOFF_FIRST_S = 0.05


def next_db_backoff(current_s: float, *, cap_s: float) -> float:
    """The next wait before probing an unreachable database: doubling, capped."""
    return min(max(current_s * 2, _DB_BACKOFF_FIRST_S), cap_s)


def next_idle_backoff(current_s: float, *, placed: bool, poll_s: float, cap_s: float) -> float:
    """Seconds until the next un-woken pass: none after a pass that placed something, else
    doubling from the poll interval up to the cap."""
    if placed:
        return 0.0
    return min(max(current_s * 2, poll_s), cap_s)


class Command(BaseCommand):
    help = "Run scheduling passes in a foreground loop, woken by LISTEN/NOTIFY (SIGTERM finishes the pass, exits)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--once", action="store_true", help="sweep, run one pass and exit")
        parser.add_argument("--poll-interval-ms", type=int, default=None,
                            help="idle wait between checks (default: scheduler.poll_interval_ms)")
        parser.add_argument("--sweep-interval-s", type=float, default=1.0, help="how often to sweep (default 1)")
        parser.add_argument("--max-idle-pass-interval-s", type=float, default=5.0,
                            help="with tasks waiting and no wake-up, retry passes at least this often (default 5)")
        parser.add_argument("--max-db-backoff-s", type=float, default=2.0,
                            help="while the database is unreachable, probe it at least this often (default 2)")

    def on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            log.info("received %s, finishing the current pass", signal.Signals(signum).name)
        self.stop_requested = True

    def handle(self, *args, once: bool, poll_interval_ms: int | None, sweep_interval_s: float,
               max_idle_pass_interval_s: float, max_db_backoff_s: float, **options) -> None:
        self.stop_requested = False
        self.db_down_since: float | None = None
        self.db_backoff_s = 0.0
        self.max_db_backoff_s = max_db_backoff_s
        self.poll_s = (poll_interval_ms or settings.SCHEDULER.poll_interval_ms) / 1000
        self.sweep_interval_s = sweep_interval_s
        self.name = registry.server_name(ControlPlaneServer.Role.SCHEDULER)
        self.passes = 0
        self.last_result: PassResult | None = None
        self.max_idle_pass_interval_s = max_idle_pass_interval_s
        self.idle_backoff_s = 0.0
        self.next_idle_pass = 0.0
        self.last_logged: tuple[int, int, int] | None = None
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

        # Name our database sessions so operators can tell them apart in pg_stat_activity.
        connection.close()
        options_ = connection.settings_dict.setdefault("OPTIONS", {})
        # "<name> host:pid:scheduler": the control-plane view maps the lock holder to this process.
        options_["application_name"] = control_plane.application_name(
            os.environ.get("PORTAL_PROCESS_NAME") or "gpu-portal-scheduler", ControlPlaneServer.Role.SCHEDULER)

        if once:
            self.sweep_step()
            self.pass_step()
            return

        self.listener: psycopg.Connection | None = None
        self.listen()
        log.info("runscheduler %s ready (poll %d ms, sweep every %.1f s)", self.name, self.poll_s * 1000,
                 self.sweep_interval_s)
        next_heartbeat = next_sweep = next_usage = next_history = 0.0
        woken = True  # a first pass at start catches up on anything missed while down
        while not self.stop_requested:
            if self.db_down_since is not None:
                # No step can work: probe with backoff; once back, catch up with a pass.
                woken = self.database_step()
                continue
            # The pass first: a wake-up is someone waiting for a placement.
            if woken:
                self.idle_backoff_s, self.next_idle_pass = 0.0, 0.0
                self.pass_step()
            elif self.idle_pass_due(time.monotonic()) and self.work_waiting():
                # Nobody woke us, yet tasks wait: GPUs may have freed up without an event
                # (live memory reported by heartbeats, an operator's edit). Retry, backing
                # off while such passes place nothing, so a stuck queue costs little.
                placed = self.pass_step()
                self.idle_backoff_s = next_idle_backoff(self.idle_backoff_s, placed=placed, poll_s=self.poll_s,
                                                        cap_s=self.max_idle_pass_interval_s)
                self.next_idle_pass = time.monotonic() + self.idle_backoff_s
            if self.stop_requested:
                break
            now = time.monotonic()
            if now >= next_heartbeat:
                self.heartbeat_step()
                next_heartbeat = now + settings.SCHEDULER.heartbeat_interval_s
            if now >= next_sweep:
                # A sweep that changes something asks for a pass (NOTIFY): the wait below returns at once.
                self.sweep_step()
                next_sweep = now + self.sweep_interval_s
            if now >= next_usage:
                self.usage_step()
                next_usage = now + USAGE_INTERVAL_S
            if now >= next_history:
                self.history_step()
                next_history = now + settings.HISTORY_SAMPLE_S
            woken = self.wait_step()
        if self.listener is not None:
            self.listener.close()
        log.info("runscheduler %s stopped after %d pass(es)", self.name, self.passes)

    # --- steps: each returns True when there is more to do ------------------------

    def pass_step(self) -> bool:
        try:
            result = run_pass(actor="scheduler")
        except Exception as exc:
            # A failed pass rolled back as a whole; the next wake-up or poll retries it.
            self.failed("scheduler pass", exc)
            return False
        self.passes += 1
        self.last_result = result
        self.last_pass_at = timezone.now().isoformat()
        self.log_pass(result)
        return result.placements > 0

    def sweep_step(self) -> bool:
        return bool(self.guarded("sweep", lambda: sweep(actor="sweep")))

    def usage_step(self) -> bool:
        """The usage ledger's upkeep: sample GPU utilisation, roll closed intervals up."""
        self.guarded("usage roll-up", usage.maintain)
        return False

    def history_step(self) -> bool:
        """Sample GPU and tenant figures for the charts (scheduling.history): set-based, off the heartbeat path."""
        self.guarded("history sampling", history.record)
        return False

    def heartbeat_step(self) -> bool:
        self.guarded("heartbeat", lambda: registry.heartbeat(ControlPlaneServer.Role.SCHEDULER, info=self.info()))
        return False

    def database_step(self) -> bool:
        """Wait (backoff, SIGTERM-aware), then probe the database. True when it is back."""
        self.db_backoff_s = next_db_backoff(self.db_backoff_s, cap_s=self.max_db_backoff_s)
        self.sleep(self.db_backoff_s)
        if self.stop_requested:
            return False
        try:
            connection.close()
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except _DB_UNAVAILABLE:
            connection.close()
            return False
        log.info("database reachable again after %.1f s; resuming", time.monotonic() - self.db_down_since)
        self.db_down_since, self.db_backoff_s = None, 0.0
        self.close_listener()  # its connection died with the old server: LISTEN again
        self.listen()
        return True

    def guarded(self, what: str, work: Callable[[], Any]) -> Any:
        """Run one unit of work; a failure is ``failed(what)`` (a database outage switches the loop
        to probing) and returns None, so one broken step never stops the loop."""
        try:
            return work()
        except Exception as exc:
            self.failed(what, exc)
            return None

    def failed(self, what: str, exc: Exception) -> None:
        """A step failed: an unreachable database switches to probing (logged once), any
        other error is logged with its traceback."""
        connection.close_if_unusable_or_obsolete()
        if isinstance(exc, _DB_UNAVAILABLE):
            if self.db_down_since is None:
                self.db_down_since = time.monotonic()
                log.warning("database unreachable (%s: %s); retrying with backoff up to %.1f s", what,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__,
                            self.max_db_backoff_s)
            return
        log.error("%s failed", what, exc_info=exc)

    def sleep(self, seconds: float) -> None:
        """Sleep in slices, so SIGTERM is noticed promptly."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested and (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(remaining, _WAIT_SLICE_S))

    def idle_pass_due(self, now: float) -> bool:
        return now >= self.next_idle_pass

    def work_waiting(self) -> bool:
        """Without a wake-up, run a pass only if tasks are waiting (GPUs may have freed up)."""
        return bool(self.guarded("queue check", Task.objects.filter(status=TaskStatus.PENDING).exists))

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
                    if self.listener is None:
                        self.sleep(remaining)  # polling only until the next turn
                        return False
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
                self.sleep(min(remaining, 1.0))
        return False

    # --- helpers -----------------------------------------------------------------

    def info(self) -> dict:
        """What the cluster view shows about this scheduler."""
        info: dict = {"passes": self.passes, "poll_interval_ms": round(self.poll_s * 1000), **registry.load_info()}
        if self.last_result is not None:
            info.update(last_pass_at=self.last_pass_at, last_pass_ms=round(self.last_result.duration_s * 1000, 1),
                        last_placements=self.last_result.placements, pending=self.last_result.pending)
        return info

    def listen(self) -> None:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        try:
            self.listener = psycopg.connect(**params, autocommit=True)
            self.listener.execute(f"LISTEN {triggers.WAKE_CHANNEL}")
        except psycopg.Error as exc:
            if self.db_down_since is None:
                log.warning("cannot LISTEN for wake-ups (%s); polling only", str(exc).strip().splitlines()[0])
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
