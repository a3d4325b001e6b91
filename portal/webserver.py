"""How a web node is started: one command line for ``make run``, the benches and deployments.

The web node is granian (a Rust HTTP server) running the ASGI application
(``portal.asgi``): HTTP and websockets on one port, served by ``workers``
processes. Measured against daphne on the same machine (``bench/api.py
--server``), it spends less CPU per request in the server itself; each worker
keeps a small pool of database connections (``DB_POOL_MAX_SIZE``), because under
ASGI every request runs in a thread of its own and would otherwise connect
afresh. ``asginl``: the ASGI interface without lifespan events, which Django and
Channels do not use.
"""

from __future__ import annotations

import os
import sys

# Connections per worker process: requests run in threads, a few at a time per worker.
POOL_PER_WORKER = 8


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def argv(host: str, port: int, workers: int | None = None, python: str = sys.executable) -> list[str]:
    return [python, "-m", "granian", "--interface", "asginl", "--host", host, "--port", str(port),
            "--workers", str(workers or default_workers()), "--respawn-failed-workers", "--log-level", "warning",
            "portal.asgi:application"]


def env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a web node: ``base`` (default: this process's) plus the pool size."""
    out = dict(os.environ if base is None else base)
    out.setdefault("DB_POOL_MAX_SIZE", str(POOL_PER_WORKER))
    return out
