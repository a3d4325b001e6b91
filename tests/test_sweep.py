"""The sweep: lost servers, assigned tasks never started, running tasks past their timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from kernel.models import Alert
from nodes.models import NodeStatus
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task
from scheduling.sweep import SWEEP_SCHEDULE_NAME, sweep


@pytest.fixture(autouse=True)
def _portal_listening(db):
    """These tests judge servers on their own silence: the portal has been listening for an hour."""
    listening_for(3600)


def listening_for(seconds: float, last_heard_ago: float = 0) -> None:
    from kernel.models import Hearing

    now = timezone.now()
    Hearing.objects.update_or_create(pk=1, defaults={"listening_since": now - timedelta(seconds=seconds),
                                                     "last_heard_at": now - timedelta(seconds=last_heard_ago)})


def holding(tenant, node, status=TaskStatus.RUNNING, gpu_index: int = 0, **fields) -> Task:
    task = Task.objects.create(tenant=tenant, name="job", command="true", status=status, node=node, **fields)
    Allocation.objects.create(task=task, gpu=node.gpus.get(index=gpu_index), node=node, memory_mb=1000)
    return task


def heard_from(node, seconds_ago: float) -> None:
    node.last_heartbeat_at = timezone.now() - timedelta(seconds=seconds_ago)
    node.save(update_fields=["last_heartbeat_at"])


def test_a_silent_server_goes_offline_and_its_tasks_are_requeued_or_failed(acme, servers):
    node = servers[0]
    heard_from(node, 31)
    retrying = holding(acme, node, started_at=timezone.now())
    spent = holding(acme, node, gpu_index=1, max_retries=0, started_at=timezone.now())

    result = sweep()

    node.refresh_from_db()
    retrying.refresh_from_db()
    spent.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    assert (retrying.status, retrying.attempt, retrying.node_id) == (TaskStatus.PENDING, 1, None)
    assert (spent.status, spent.failure_reason) == (TaskStatus.FAILED, "server gpu-01 lost (no retries left)")
    assert not Allocation.objects.filter(node=node, released_at__isnull=True).exists()
    alert = Alert.objects.get(kind=Alert.Kind.SERVER_LOST)
    assert alert.node == node
    assert (result.servers_lost, result.requeued, result.failed) == (1, 1, 1)


def test_a_server_heard_from_within_the_timeout_stays_active(acme, servers):
    heard_from(servers[0], 5)
    task = holding(acme, servers[0], started_at=timezone.now())

    assert not sweep()

    servers[0].refresh_from_db()
    assert servers[0].status == NodeStatus.ACTIVE
    assert Task.objects.get(pk=task.pk).status == TaskStatus.RUNNING


def test_an_assigned_task_not_started_within_the_grace_period_returns_to_pending(acme, servers):
    late = holding(acme, servers[0], status=TaskStatus.ASSIGNED, assigned_at=timezone.now() - timedelta(seconds=121))
    fresh = holding(acme, servers[1], status=TaskStatus.ASSIGNED, assigned_at=timezone.now())

    sweep()

    late.refresh_from_db()
    assert (late.status, late.attempt) == (TaskStatus.PENDING, 1)
    assert "not started within 120 s" in late.events.last().reason
    assert Task.objects.get(pk=fresh.pk).status == TaskStatus.ASSIGNED


def test_a_task_past_its_timeout_is_timed_out_and_its_agent_told(acme, servers, monkeypatch):
    told: list[list[int]] = []
    monkeypatch.setattr("kernel.live.assignments_changed", lambda ids: told.append(sorted(ids)))
    over = holding(acme, servers[0], timeout_s=60, started_at=timezone.now() - timedelta(seconds=61))
    within = holding(acme, servers[1], timeout_s=60, started_at=timezone.now() - timedelta(seconds=30))

    result = sweep()

    over.refresh_from_db()
    assert (over.status, over.failure_reason) == (TaskStatus.TIMED_OUT, "exceeded its timeout of 60 s")
    assert not over.allocations.filter(released_at__isnull=True).exists()
    assert Task.objects.get(pk=within.pk).status == TaskStatus.RUNNING
    assert told == [[servers[0].pk]]
    assert result.timed_out == 1


def test_a_sweep_that_changed_something_asks_for_a_pass(acme, servers, django_capture_on_commit_callbacks,
                                                        monkeypatch):
    reasons: list[str] = []
    monkeypatch.setattr("scheduling.triggers.wake", lambda reason: reasons.append(reason) or False)
    holding(acme, servers[0], timeout_s=1, started_at=timezone.now() - timedelta(seconds=5))

    with django_capture_on_commit_callbacks(execute=True):
        sweep()

    assert reasons and reasons[0].startswith("sweep:")


def test_the_minute_sweep_schedule_is_registered_once(db):
    from django.core.management import call_command
    from django_q.models import Schedule

    call_command("migrate", verbosity=0)  # post_migrate registers it again: still one
    schedule = Schedule.objects.get(name=SWEEP_SCHEDULE_NAME)
    assert (schedule.func, schedule.schedule_type, schedule.minutes) == ("scheduling.sweep.sweep_task", "I", 1)
    assert Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).count() == 1


def test_a_server_in_maintenance_is_left_as_the_operator_set_it(acme, servers):
    node = servers[0]
    node.status = NodeStatus.MAINTENANCE
    node.save()
    heard_from(node, 300)

    assert not sweep()

    node.refresh_from_db()
    assert node.status == NodeStatus.MAINTENANCE
    assert not Alert.objects.exists()
