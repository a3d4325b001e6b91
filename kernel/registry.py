"""Control-plane server registry: every web, scheduler and worker process of the
portal registers itself as a ``ControlPlaneServer`` row named ``host:pid:role``
and refreshes ``last_seen_at`` with a heartbeat; rows that stop beating are dead
after ``dead_after_s()`` and deleted after ``PRUNE_AFTER_S``.

Interface for other processes (the scheduler, q workers)::

    from kernel import registry
    registry.register("scheduler", version="1", info={...})   # once, at start
    registry.heartbeat("scheduler")                          # every loop turn (cheap, one UPDATE)
    registry.start_background("scheduler")                   # or: a daemon thread that does both
    registry.unregister("scheduler")                         # on a clean exit (optional)

Web processes start the background thread on their first HTTP request through
ASGI (``portal.asgi``), so a daphne behind a load balancer appears in
``/api/v1/cluster`` and in the admin without any setup.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import QuerySet
from django.utils import timezone

from kernel import hearing
from kernel.models import ControlPlaneServer

log = logging.getLogger(__name__)

# Dead rows stay visible this long (to the admin and /api/v1/cluster), then go.
PRUNE_AFTER_S = 600
VERSION = "0.1.0"

_started: set[str] = set()
_start_lock = threading.Lock()


def interval_s() -> int:
    return settings.SCHEDULER.heartbeat_interval_s


def dead_after_s() -> int:
    """A process that missed three heartbeats is dead."""
    return 3 * interval_s()


def server_name(role: str, pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid or os.getpid()}:{role}"


def register(role: str, *, version: str = VERSION, info: dict[str, Any] | None = None) -> ControlPlaneServer:
    """Create or refresh this process's row (idempotent)."""
    if role not in ControlPlaneServer.Role.values:
        raise ValueError(f"unknown control-plane role {role!r}")
    now = timezone.now()
    server, _ = ControlPlaneServer.objects.update_or_create(
        name=server_name(role),
        defaults={"role": role, "hostname": socket.gethostname(), "pid": os.getpid(), "version": version,
                  "last_seen_at": now, "info": info or {}},
        create_defaults={"role": role, "hostname": socket.gethostname(), "pid": os.getpid(), "version": version,
                         "started_at": now, "last_seen_at": now, "info": info or {}},
    )
    return server


def heartbeat(role: str, *, info: dict[str, Any] | None = None) -> None:
    """Refresh ``last_seen_at``; re-registers when the row was pruned meanwhile."""
    fields: dict[str, Any] = {"last_seen_at": timezone.now()}
    if info is not None:
        fields["info"] = info
    if not ControlPlaneServer.objects.filter(name=server_name(role)).update(**fields):
        register(role, info=info)


def load_info() -> dict[str, Any]:
    """The host's load, for the control-plane view."""
    return {"load1": round(os.getloadavg()[0], 2)}


def unregister(role: str) -> None:
    ControlPlaneServer.objects.filter(name=server_name(role)).delete()


def prune(older_than_s: int = PRUNE_AFTER_S) -> int:
    """Delete rows silent for longer than ``older_than_s``; returns how many."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    deleted, _ = ControlPlaneServer.objects.filter(last_seen_at__lt=cutoff).delete()
    return deleted


def alive() -> QuerySet[ControlPlaneServer]:
    return ControlPlaneServer.objects.filter(last_seen_at__gte=timezone.now() - timedelta(seconds=dead_after_s()))


def is_alive(server: ControlPlaneServer) -> bool:
    return (timezone.now() - server.last_seen_at).total_seconds() <= dead_after_s()


def _loop(role: str, stop: threading.Event) -> None:
    failing = False
    while True:
        try:
            heartbeat(role, info=load_info())
            if role == ControlPlaneServer.Role.WEB:
                # A live web node on a reachable database can hear agents: evidence the
                # sweep needs before it judges any server (kernel.hearing).
                hearing.heard()
            prune()
            if failing:
                log.info("control-plane heartbeat for %s works again", role)
            failing = False
        except Exception:  # the database may be briefly away; the next beat retries
            if not failing:  # once per outage, not once per beat
                log.warning("control-plane heartbeat for %s failed; retrying every %s s", role, interval_s(),
                            exc_info=True)
            failing = True
        finally:
            # This thread's connection must not outlive a DB restart or leak.
            connection.close()
        if stop.wait(interval_s()):
            return


def start_background(role: str) -> bool:
    """Start (once per process and role) a daemon thread that registers and beats.
    Returns False when it was already running."""
    with _start_lock:
        if role in _started:
            return False
        _started.add(role)
    stop = threading.Event()
    thread = threading.Thread(target=_loop, args=(role, stop), name=f"registry-{role}", daemon=True)
    thread.start()

    def _at_exit() -> None:
        stop.set()
        try:
            close_old_connections()
            unregister(role)
        except Exception:  # exiting anyway; the row will age out
            log.debug("unregister at exit failed", exc_info=True)

    atexit.register(_at_exit)
    return True
