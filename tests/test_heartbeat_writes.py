"""The usual heartbeat is written by one set-based statement that stores exactly the
reported values, as the transaction path does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from nodes import heartbeat
from nodes.models import GPU, GPUHealth, Node, NodeStatus
from tests.conftest import database_url, make_server

FIELDS = ("uuid", "model_name", "memory_total_mb", "memory_used_mb", "utilization_pct", "temperature_c", "power_w",
          "ecc_errors", "retired_pages")


def report(node: Node, gpus: int) -> dict:
    return {"name": node.name, "agent_version": "9.9", "hostname": f"{node.name}.example", "gpus": [
        {"index": i, "uuid": f"GPU-{node.name}-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81_559,
         "memory_used_mb": 1_000 * (i + 1), "utilization_pct": 10 + i, "temperature_c": 50 + i, "power_w": 200 + i,
         "ecc_errors": 0, "retired_pages": i, "retired_pages_pending": i == 1} for i in range(gpus)]}


def test_the_usual_heartbeat_is_one_write_statement_storing_every_reported_value(db):
    node = make_server("hb-01", gpus=4)
    GPU.objects.filter(node=node, index=3).update(health=GPUHealth.ERROR)  # an error stays until an operator clears it
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.OFFLINE)
    data = report(node, 4)
    with CaptureQueriesContext(connection) as queries:
        result = heartbeat.ingest(node, data)

    writes = [q["sql"] for q in queries.captured_queries
              if ("UPDATE" in q["sql"] or "INSERT" in q["sql"]) and "nodes_" in q["sql"]]  # not the hearing stamp
    assert len(writes) == 1 and "UPDATE nodes_node" in writes[0] and "UPDATE nodes_gpu" in writes[0]
    rows = list(GPU.objects.filter(node=node).order_by("index"))
    assert [tuple(getattr(g, f) for f in FIELDS) for g in rows] == [
        (g["uuid"], g["name"], g["memory_total_mb"], g["memory_used_mb"], g["utilization_pct"], g["temperature_c"],
         g["power_w"], g["ecc_errors"], g["retired_pages"]) for g in data["gpus"]]
    assert [g.health for g in rows] == [GPUHealth.OK, GPUHealth.WARNING, GPUHealth.OK, GPUHealth.ERROR]
    assert (result.came_online, result.updated_gpus, result.created_gpus) == (True, 4, 0)
    node.refresh_from_db()
    assert (node.status, node.agent_version, node.hostname) == (NodeStatus.ACTIVE, "9.9", "hb-01.example")


def test_a_report_that_adds_a_gpu_takes_the_transaction_path_and_stores_the_same_way(db):
    node = make_server("hb-02", gpus=2)
    data = report(node, 3)
    with CaptureQueriesContext(connection) as queries:
        result = heartbeat.ingest(node, data)

    writes = [q["sql"] for q in queries.captured_queries
              if ("UPDATE" in q["sql"] or "INSERT" in q["sql"]) and "nodes_" in q["sql"]]
    assert len(writes) == 3  # the server's row, the known GPUs, the new one
    rows = list(GPU.objects.filter(node=node).order_by("index"))
    assert [(g.uuid, g.memory_used_mb, g.health) for g in rows] == [
        ("GPU-hb-02-0", 1_000, GPUHealth.OK), ("GPU-hb-02-1", 2_000, GPUHealth.WARNING),
        ("GPU-hb-02-2", 3_000, GPUHealth.OK)]
    assert (result.updated_gpus, result.created_gpus) == (2, 1)


@contextmanager
def lock_timeout(value: str) -> Iterator[None]:
    """A wait for a row lock ends in an error after ``value`` on the test's connection, not in a hung suite."""
    with connection.cursor() as cursor:
        cursor.execute(f"SET lock_timeout = '{value}'")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")


def test_a_heartbeat_does_not_wait_for_a_transaction_that_references_its_server(transactional_db):
    """A pass that places a task on a server, or an agent's report, checks its foreign keys to
    the server's row (FOR KEY SHARE, held to its commit). The heartbeat rewrites only the row's
    other columns, so it takes the lock that does not conflict with those (FOR NO KEY UPDATE):
    with FOR UPDATE each heartbeat waited for such a transaction to end, and it for the heartbeat."""
    node = make_server("hb-03", gpus=2)
    with psycopg.connect(database_url()) as other:
        other.execute("SELECT 1 FROM nodes_node WHERE id = %s FOR KEY SHARE", [node.pk])  # its transaction stays open
        with lock_timeout("5s"):
            heartbeat.ingest(node, report(node, 2))
        assert GPU.objects.get(node=node, index=1).memory_used_mb == 2_000

        # Whoever needs the row whole still waits for the heartbeat, and the heartbeat for it:
        # the sweep that marks a silent server offline takes FOR UPDATE.
        other.rollback()
        other.execute("SELECT 1 FROM nodes_node WHERE id = %s FOR UPDATE", [node.pk])
        with lock_timeout("100ms"), pytest.raises(OperationalError, match="lock timeout"):
            heartbeat.ingest(node, report(node, 2))
        other.rollback()
