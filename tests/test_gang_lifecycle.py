"""A gang's life in the portal: the start barrier, its timeout, and one rank ending the whole gang."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from django.utils import timezone

from scheduling import lifecycle
from scheduling.assignments import current_etag, desired_state
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from scheduling.sweep import sweep
from tests.test_sweep import listening_for

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _portal_listening(db):
    """The sweep judges on evidence: the portal has been listening for an hour."""
    listening_for(3600)


@pytest.fixture
def placed_gang(settings, acme, servers) -> Task:
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    acme.quota.max_gpus, acme.quota.max_gpu_memory_mb = 16, 10**7
    acme.quota.save()
    task = Task.objects.create(tenant=acme, name="ddp", command="torchrun train.py", gpu_count=16, nodes=2)
    assert run_pass().placements == 1
    task.refresh_from_db()
    return task


def ranks(task):
    return {r.rank: r for r in task.current_ranks()}


def test_the_barrier_opens_with_rank_0s_address_and_port_once_every_rank_is_ready(placed_gang):
    task = placed_gang
    r = ranks(task)
    spec = desired_state(r[1].node_id)["tasks"][0]
    assert spec["gang"] == {"rank": 1, "nodes": 2, "gpus_per_node": 8, "master_addr": None, "master_port": None}
    assert spec["gpu_indices"] == list(range(8))
    lifecycle.report_ready(task.pk, node_id=r[1].node_id, actor="agent", attempt=0, address="10.0.0.2")
    task.refresh_from_db()
    assert task.master_port is None  # rank 0 not there yet
    lifecycle.report_ready(task.pk, node_id=r[0].node_id, actor="agent", attempt=0, address="10.0.0.1", port=29511)
    task.refresh_from_db()
    assert (task.master_addr, task.master_port) == ("10.0.0.1", 29511)
    assert desired_state(r[1].node_id)["tasks"][0]["gang"]["master_port"] == 29511
    lifecycle.report_started(task.pk, node_id=r[0].node_id, actor="agent", attempt=0)
    task.refresh_from_db()
    assert task.status == "assigned"  # running once every rank runs
    lifecycle.report_started(task.pk, node_id=r[1].node_id, actor="agent", attempt=0)
    task.refresh_from_db()
    assert task.status == "running"


def test_the_heartbeats_etag_is_the_desired_states_on_every_rank_through_the_barrier(placed_gang, servers):
    task = placed_gang
    r = ranks(task)

    def same_everywhere() -> set[str]:
        etags = set()
        for node in servers:
            state = desired_state(node.pk)
            assert current_etag(node.pk) == state["etag"], node.name
            etags.add(state["etag"])
        return etags

    before = same_everywhere()
    lifecycle.report_ready(task.pk, node_id=r[0].node_id, actor="agent", attempt=0, address="10.0.0.1", port=29511)
    lifecycle.report_ready(task.pk, node_id=r[1].node_id, actor="agent", attempt=0, address="10.0.0.2")
    assert same_everywhere() != before  # the barrier opening changes what the agents must do
    lifecycle.cancel(task.pk, actor="test")
    assert same_everywhere() == {desired_state(servers[0].pk)["etag"]}  # nothing left anywhere


def test_a_rank_that_never_reaches_the_barrier_requeues_the_whole_gang(placed_gang, settings):
    task = placed_gang
    r = ranks(task)
    lifecycle.report_ready(task.pk, node_id=r[0].node_id, actor="agent", attempt=0, address="10.0.0.1", port=29511)
    Task.objects.filter(pk=task.pk).update(
        assigned_at=timezone.now() - timedelta(seconds=settings.SCHEDULER.gang_start_timeout_s + 1))
    sweep()
    task.refresh_from_db()
    assert (task.status, task.attempt, task.master_port) == ("pending", 1, None)
    reason = task.events.get(to_status="pending").reason
    assert reason.startswith("start barrier timed out after 120 s: rank 0 on ")
    assert not Allocation.objects.filter(task=task, released_at__isnull=True).exists()
    assert desired_state(r[0].node_id)["tasks"] == desired_state(r[1].node_id)["tasks"] == []


def test_a_rank_exiting_with_an_error_fails_the_gang_and_success_waits_for_every_rank(placed_gang):
    task = placed_gang
    r = ranks(task)
    for rank in (0, 1):
        lifecycle.report_ready(task.pk, node_id=r[rank].node_id, actor="agent", attempt=0, address="h", port=1)
        lifecycle.report_started(task.pk, node_id=r[rank].node_id, actor="agent", attempt=0)
    lifecycle.report_finished(task.pk, node_id=r[0].node_id, exit_code=0, actor="agent", attempt=0)
    task.refresh_from_db()
    assert task.status == "running"
    lifecycle.report_finished(task.pk, node_id=r[1].node_id, exit_code=3, actor="agent", attempt=0)
    task.refresh_from_db()
    assert task.status == "failed"
    assert task.failure_reason.startswith("rank 1 on ") and "exit code 3; every rank was stopped" in \
        task.failure_reason


def test_a_lost_server_requeues_the_gang_and_frees_the_other_servers_gpus(placed_gang, settings):
    task = placed_gang
    r = ranks(task)
    from nodes.models import Node

    Node.objects.filter(pk=r[1].node_id).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    Node.objects.filter(pk=r[0].node_id).update(last_heartbeat_at=timezone.now())
    sweep()
    task.refresh_from_db()
    assert (task.status, task.attempt) == ("pending", 1)
    assert not Allocation.objects.filter(task=task, released_at__isnull=True).exists()
