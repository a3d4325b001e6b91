"""How a web node is started: one command line for ``make run``, the benches and deployments.

The web node is granian (a Rust HTTP server) running the ASGI application
(``portal.asgi``): HTTP and websockets on one port, served by ``workers``
processes. Measured against daphne on the same machine (``bench/api.py
--server``), it spends less CPU per request in the server itself. HTTP requests
do not go through Django's ASGI adaptation: ``portal.threaded_http`` runs
Django's synchronous handler on a pool of threads per worker, as many as the
worker's database connections (``DB_POOL_MAX_SIZE``, a pool: without it each
request would connect afresh). ``asginl``: the ASGI interface without lifespan
events, which Django and Channels do not use.
"""

from __future__ import annotations

import os
import sys

# Connections per worker process, and threads running requests (portal.threaded_http).
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
