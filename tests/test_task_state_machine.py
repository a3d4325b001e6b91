"""Every state change writes its event and keeps allocations in step."""

from __future__ import annotations

import pytest
from django.db import transaction
from django.db.transaction import TransactionManagementError

from scheduling.choices import TaskStatus
from scheduling.models import Allocation, InvalidTransition, Task


def _assigned_task(tenant, gpu, **kw) -> Task:
    task = Task.objects.create(tenant=tenant, name="job", command="true", status=TaskStatus.ASSIGNED, node=gpu.node,
                               **kw)
    Allocation.objects.create(task=task, gpu=gpu, node=gpu.node, memory_mb=1000)
    return task


def test_a_finished_task_releases_its_gpus_and_records_the_change(acme, servers):
    gpu = servers[0].gpus.first()
    task = _assigned_task(acme, gpu)
    with transaction.atomic():
        task = Task.locked(task.pk)
        task.mark_running(actor="agent:gpu-01")
        task.finish(exit_code=0, actor="agent:gpu-01")
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED
    assert task.started_at and task.finished_at
    assert not Allocation.objects.filter(gpu=gpu, released_at__isnull=True).exists()
    assert list(task.events.values_list("from_status", "to_status", "actor")) == [
        ("assigned", "running", "agent:gpu-01"),
        ("running", "succeeded", "agent:gpu-01"),
    ]


def test_a_nonzero_exit_fails_the_task_with_its_exit_code(acme, servers):
    task = _assigned_task(acme, servers[0].gpus.first())
    with transaction.atomic():
        Task.locked(task.pk).finish(exit_code=3, actor="agent:gpu-01")
    task.refresh_from_db()
    assert (task.status, task.exit_code, task.failure_reason) == (TaskStatus.FAILED, 3, "exit code 3")


def test_requeue_counts_an_attempt_until_retries_run_out(acme, servers):
    gpu = servers[0].gpus.first()
    task = _assigned_task(acme, gpu, max_retries=1)
    with transaction.atomic():
        Task.locked(task.pk).requeue(actor="sweep", reason="server lost")
    task.refresh_from_db()
    assert (task.status, task.attempt, task.node) == (TaskStatus.PENDING, 1, None)
    assert task.pending_reason == "requeued: server lost"

    Task.objects.filter(pk=task.pk).update(status=TaskStatus.ASSIGNED)
    Allocation.objects.create(task=task, gpu=gpu, node=gpu.node, memory_mb=1000)
    with transaction.atomic():
        Task.locked(task.pk).requeue(actor="sweep", reason="server lost")
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert task.failure_reason == "server lost (no retries left)"
    assert not task.allocations.filter(released_at__isnull=True).exists()


def test_a_final_task_cannot_change_state_again(acme, servers):
    task = _assigned_task(acme, servers[0].gpus.first())
    with transaction.atomic():
        Task.locked(task.pk).cancel(actor="user:alice")
    with pytest.raises(InvalidTransition), transaction.atomic():
        Task.locked(task.pk).mark_running(actor="agent:gpu-01")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_locking_a_task_outside_a_transaction_is_refused(acme):
    task = Task.objects.create(tenant=acme, name="job", command="true")
    with pytest.raises(TransactionManagementError):
        Task.locked(task.pk)
