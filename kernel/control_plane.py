"""What operators see of the control plane (seed 000's coordinator view).

Who holds the scheduler lock is read from PostgreSQL itself: every pass takes a
transaction-scoped advisory lock right after the scheduler row lock
(``scheduling.lock.lock_scheduler``), so ``pg_locks`` names the holder's backend
and ``pg_stat_activity`` its application name (``<process> <host:pid:role>``, set by
``runscheduler`` and q workers) and since when its transaction runs. Nothing here
trusts a row written inside the holder's transaction: a holder that died holds
nothing, whatever it wrote.

Every process (web, scheduler, q worker) appears from the registry
(``kernel.registry``) with its role, heartbeat, load and, for schedulers, its last pass.
"""

from __future__ import annotations

from typing import Any

from django.db import connection

from kernel import registry
from kernel.models import ControlPlaneServer

# scheduling.lock.SCHEDULER_ADVISORY_KEY, split as pg_locks shows a bigint key.
_ADVISORY_KEY = 0x5C4ED

_HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr), a.xact_start, a.state, now() - a.xact_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_WAITING_SQL = """
SELECT count(*) FROM pg_locks l
WHERE NOT l.granted AND l.locktype IN ('advisory', 'tuple', 'transactionid')
  AND l.database IS NOT DISTINCT FROM (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def scheduler_lock() -> dict[str, Any]:
    """The lock's holder right now (or ``holder: None``), from pg_locks / pg_stat_activity."""
    with connection.cursor() as cursor:
        cursor.execute(_HOLDER_SQL, [_ADVISORY_KEY >> 32, _ADVISORY_KEY & 0xFFFFFFFF])
        row = cursor.fetchone()
    if row is None:
        return {"held": False, "holder": None}
    pid, app, client, since, state, held_for = row
    # "<process name> <host:pid:role>": the registry name is the last word.
    process = app.rsplit(" ", 1)[-1] if app and " " in app else None
    return {"held": True, "holder": {"backend_pid": pid, "application_name": app, "client_addr": client,
                                     "process": process, "since": since, "state": state,
                                     "held_for_ms": round(held_for.total_seconds() * 1000, 1) if held_for else None}}


def processes() -> list[dict[str, Any]]:
    """Every registered web, scheduler and q worker process, newest heartbeat first per role."""
    out = []
    for s in ControlPlaneServer.objects.order_by("role", "name"):
        info = s.info or {}
        out.append({"name": s.name, "role": s.role, "hostname": s.hostname, "pid": s.pid, "version": s.version,
                    "started_at": s.started_at, "last_seen_at": s.last_seen_at, "alive": registry.is_alive(s),
                    "load1": info.get("load1"), "last_pass_at": info.get("last_pass_at"),
                    "last_pass_ms": info.get("last_pass_ms"), "passes": info.get("passes")})
    return out


def snapshot() -> dict[str, Any]:
    procs = processes()
    return {"scheduler_lock": scheduler_lock(), "processes": procs,
            "q_workers": [p for p in procs if p["role"] == ControlPlaneServer.Role.WORKER]}


def application_name(base: str, role: str) -> str:
    """What a process names its database sessions: ``<base> <host:pid:role>`` (63 bytes at most),
    so the lock holder in pg_stat_activity maps back to its registry row."""
    return f"{base} {registry.server_name(role)}"[-63:]
