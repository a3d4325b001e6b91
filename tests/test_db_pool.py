"""A web node's pooled database connections: one the server dropped is never handed to a request.

The web node keeps a pool of connections per process (``DB_POOL_MAX_SIZE``). When PostgreSQL ends
them (a restart, a failover, ``pg_terminate_backend``, an idle timeout) while they wait in the
pool, the next requests must still be answered from a working connection, not with 503s.
"""

from __future__ import annotations

import httpx
import psycopg
import pytest
from django.db import connection, connections

from tests.conftest import daphne, make_api_token, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NAME = "gpu-portal-pool-test"


@pytest.fixture
def pooled_web():
    with daphne(subprocess_env(DB_POOL_MAX_SIZE="3", PORTAL_PROCESS_NAME=NAME, API_RATE_LIMIT="0")) as url:
        yield url


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


@pytest.fixture
def pooled_wrapper():
    from kernel.postgres.base import DatabaseWrapper

    settings = {**connection.settings_dict, "CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False,
                "OPTIONS": {**connection.settings_dict["OPTIONS"], "application_name": NAME,
                            "pool": {"min_size": 1, "max_size": 1}}}
    wrapper = DatabaseWrapper(settings, alias="pool-test")
    connections.settings["pool-test"] = settings  # looked up by django.contrib.postgres on connect
    connections["pool-test"] = wrapper
    yield wrapper
    wrapper.close()
    wrapper.close_pool()
    del connections["pool-test"]
    del connections.settings["pool-test"]


def test_a_healthy_pooled_connection_is_handed_out_without_a_query(pooled_wrapper, monkeypatch):
    pooled_wrapper.connect()
    first = pooled_wrapper.connection
    pooled_wrapper.close()  # back to the pool
    sent = []
    monkeypatch.setattr(psycopg.Connection, "execute", lambda self, query, *a, **k: sent.append(query))
    pooled_wrapper.connect()
    assert pooled_wrapper.connection is first and sent == []


def test_a_pooled_connection_the_server_ended_is_replaced_before_it_is_handed_out(pooled_wrapper):
    pooled_wrapper.connect()
    first = pooled_wrapper.connection
    pid = first.info.backend_pid
    pooled_wrapper.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_for(lambda: pid not in pool_backends(), what="the backend to end")

    pooled_wrapper.connect()
    with pooled_wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid
    assert first.closed
