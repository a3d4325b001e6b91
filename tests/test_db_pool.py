"""A web node's pooled database connections: one the server dropped is never handed to a request.

The web node keeps a pool of connections per process (``DB_POOL_MAX_SIZE``). When PostgreSQL ends
them (a restart, a failover, ``pg_terminate_backend``, an idle timeout) while they wait in the
pool, the next requests must still be answered from a working connection, not with 503s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.db import connection

from tests.conftest import free_port, make_api_token, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
NAME = "gpu-portal-pool-test"


@pytest.fixture
def pooled_web():
    port = free_port()
    env = subprocess_env(DB_POOL_MAX_SIZE="3", PORTAL_PROCESS_NAME=NAME, API_RATE_LIMIT="0")
    proc = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                             "portal.asgi:application"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daphne exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout=30, what="daphne")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pool_backends() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                       [NAME])
        return [pid for (pid,) in cursor.fetchall()]


def test_requests_after_the_server_ended_every_pooled_connection_are_answered(pooled_web, alice, acme):
    headers = {"Authorization": f"Token {make_api_token(alice)}"}
    with httpx.Client(base_url=pooled_web, headers=headers, timeout=10) as client:
        for _ in range(6):  # the pool holds several connections now
            assert client.get("/api/v1/tasks").status_code == 200
        ended = pool_backends()
        assert ended
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [ended])
        wait_for(lambda: not set(pool_backends()) & set(ended), what="the terminated backends to be gone")
        # Each ended connection is found out before a request gets it.
        statuses = [client.get("/api/v1/tasks").status_code for _ in range(8)]
    assert statuses == [200] * 8
    assert set(pool_backends()).isdisjoint(ended)
