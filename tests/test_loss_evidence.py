"""A server is declared lost on evidence only: the portal's own silence (a start, a
database or web outage) and a mass silence (a network or control-plane fault) are not
evidence against the servers; the operator's drain survives an offline/online blip."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from kernel import hearing
from kernel.models import Alert, Hearing
from nodes.heartbeat import ingest
from nodes.models import NodeStatus
from scheduling.choices import TaskStatus
from scheduling.models import Task
from scheduling.sweep import sweep
from tests.conftest import make_server
from tests.test_sweep import heard_from, holding, listening_for


@pytest.fixture(autouse=True)
def _portal_listening(db):
    listening_for(3600)


def report(node) -> dict:
    return {"gpus": [{"index": g.index, "uuid": g.uuid, "name": g.model_name, "memory_total_mb": g.memory_total_mb,
                      "memory_used_mb": 0, "utilization_pct": 0, "temperature_c": 40, "power_w": 100,
                      "ecc_errors": 0, "retired_pages": 0} for g in node.gpus.order_by("index")]}


def test_after_a_portal_outage_a_silent_server_gets_a_full_timeout_before_it_is_lost(acme, servers):
    node = servers[0]
    heard_from(node, 45)  # last heard before a 45 s outage
    task = holding(acme, node, started_at=timezone.now())
    listening_for(5)  # the portal hears again since 5 s (another server's heartbeat)

    assert not sweep()
    node.refresh_from_db()
    task.refresh_from_db()
    assert (node.status, task.status, task.attempt) == (NodeStatus.ACTIVE, TaskStatus.RUNNING, 0)

    listening_for(31)  # a full timeout of listening, and still nothing from it: now it is lost
    assert sweep().servers_lost == 1
    task.refresh_from_db()
    assert (task.status, task.attempt) == (TaskStatus.PENDING, 1)


def test_while_the_portal_hears_nobody_no_server_is_judged(acme, servers):
    heard_from(servers[0], 120)
    task = holding(acme, servers[0], started_at=timezone.now())
    listening_for(3600, last_heard_ago=60)  # web nodes or database down for a minute: deaf now

    assert not sweep()
    assert Task.objects.get(pk=task.pk).status == TaskStatus.RUNNING


def test_hearing_again_after_a_gap_restarts_the_listening_clock(db):
    listening_for(3600, last_heard_ago=hearing.gap_s() + 5)

    assert hearing.heard(force=True)

    row = Hearing.objects.get()
    assert timezone.now() - row.listening_since < timedelta(seconds=5)
    listening_for(3600)
    assert hearing.heard(force=True)
    assert timezone.now() - Hearing.objects.get().listening_since > timedelta(seconds=3000)


def test_a_heartbeat_is_evidence_that_the_portal_hears(db, servers, monkeypatch):
    Hearing.objects.all().delete()
    monkeypatch.setattr(hearing, "_last_touch", 0.0)  # no touch from an earlier test this second

    ingest(servers[0], report(servers[0]))

    assert Hearing.objects.get().last_heard_at > timezone.now() - timedelta(seconds=5)


def test_when_most_servers_fall_silent_at_once_nobody_is_declared_lost(acme, servers):
    third = make_server("gpu-03")
    for node in (*servers, third):
        heard_from(node, 5)
    tasks = [holding(acme, node, started_at=timezone.now()) for node in servers]
    heard_from(servers[0], 60)
    heard_from(servers[1], 60)  # two of three silent: a network or control-plane fault

    result = sweep()

    assert (result.servers_lost, result.held_back) == (0, 2)
    assert all(t.status == TaskStatus.RUNNING for t in Task.objects.filter(pk__in=[t.pk for t in tasks]))
    assert Alert.objects.get(kind=Alert.Kind.MASS_SILENCE).message.startswith("2 of 3 servers silent")


def test_one_silent_server_among_three_is_lost(acme, servers):
    third = make_server("gpu-03")
    for node in (*servers, third):
        heard_from(node, 5)
    heard_from(third, 60)

    assert sweep().servers_lost == 1
    third.refresh_from_db()
    assert third.status == NodeStatus.OFFLINE


def test_a_drained_server_that_blips_offline_comes_back_drained(acme, servers):
    node = servers[0]
    node.set_intent(NodeStatus.DRAINING, "drained by operator")
    heard_from(node, 31)
    sweep()
    node.refresh_from_db()
    assert (node.status, node.intent) == (NodeStatus.OFFLINE, NodeStatus.DRAINING)

    assert ingest(node, report(node)).came_online

    node.refresh_from_db()
    assert (node.status, node.intent) == (NodeStatus.DRAINING, NodeStatus.DRAINING)


def test_draining_an_offline_server_is_remembered_for_its_return(acme, servers):
    node = servers[0]
    node.status = NodeStatus.OFFLINE
    node.save()

    node.set_intent(NodeStatus.DRAINING, "drained while away")
    node.refresh_from_db()
    assert (node.status, node.intent) == (NodeStatus.OFFLINE, NodeStatus.DRAINING)

    ingest(node, report(node))
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING
