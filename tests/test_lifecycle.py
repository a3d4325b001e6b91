"""Agent and user reports on a task: started, finished, OOM, cancelled."""

from __future__ import annotations

import pytest

from scheduling import lifecycle
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, ModelMemoryEstimate, Task


@pytest.fixture
def assigned(acme, servers):
    gpu = servers[0].gpus.first()
    task = Task.objects.create(tenant=acme, name="infer", command="python infer.py", model_name="deepseek-7b",
                               gpu_memory_mb=20_000, status=TaskStatus.ASSIGNED, node=servers[0], max_retries=1)
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=20_000)
    return task


def test_a_repeated_start_report_changes_nothing(assigned, servers):
    lifecycle.report_started(assigned.pk, node_id=servers[0].pk, actor="agent:gpu-01")
    lifecycle.report_started(assigned.pk, node_id=servers[0].pk, actor="agent:gpu-01")
    assert assigned.events.filter(to_status="running").count() == 1


def test_another_server_cannot_report_on_the_task(assigned, servers):
    with pytest.raises(PermissionError):
        lifecycle.report_finished(assigned.pk, node_id=servers[1].pk, exit_code=0, actor="agent:gpu-02")
    assert Task.objects.get(pk=assigned.pk).status == TaskStatus.ASSIGNED


def test_an_oom_raises_the_model_estimate_by_the_factor_and_retries(assigned, servers):
    lifecycle.report_started(assigned.pk, node_id=servers[0].pk, actor="agent:gpu-01")
    task = lifecycle.report_finished(assigned.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    assert ModelMemoryEstimate.objects.get(model_name="deepseek-7b").memory_mb == 24_000
    task.refresh_from_db()
    # The retry shows the memory it will ask for and why the last attempt ended.
    assert (task.status, task.attempt, task.oom, task.gpu_memory_mb) == (TaskStatus.PENDING, 1, True, 24_000)
    assert task.failure_reason == "CUDA out of memory"
    assert task.pending_reason == "requeued: CUDA out of memory; retrying with 24000 MB per GPU"
    assert not Allocation.objects.filter(task=task, released_at__isnull=True).exists()

    # Second OOM: the estimate grows again and, out of retries, the task fails.
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING, node=servers[0])
    Allocation.objects.create(task=task, gpu=servers[0].gpus.first(), node=servers[0], memory_mb=24_000)
    task = lifecycle.report_finished(task.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    assert ModelMemoryEstimate.objects.get(model_name="deepseek-7b").memory_mb == 28_800
    assert (task.status, task.failure_reason) == (TaskStatus.FAILED, "CUDA out of memory")


def test_a_finish_report_for_a_cancelled_task_is_ignored(assigned, servers):
    lifecycle.cancel(assigned.pk, actor="user:alice")
    task = lifecycle.report_finished(assigned.pk, node_id=servers[0].pk, exit_code=-15, actor="agent:gpu-01")
    assert task.status == TaskStatus.CANCELLED
    assert task.events.count() == 1


def test_an_oom_reported_with_an_exit_code_still_reads_as_an_oom(assigned, servers):
    lifecycle.report_started(assigned.pk, node_id=servers[0].pk, actor="agent:gpu-01")
    task = lifecycle.report_finished(assigned.pk, node_id=servers[0].pk, exit_code=1, oom=True,
                                     reason="exit code 1 after 3.0 s", actor="agent:gpu-01")
    assert task.failure_reason == "CUDA out of memory (exit code 1 after 3.0 s)"
    assert task.events.latest("pk").reason == (
        "CUDA out of memory (exit code 1 after 3.0 s); retrying with 24000 MB per GPU")


def test_an_oom_without_a_model_retries_with_its_own_request_raised(acme, servers):
    task = Task.objects.create(tenant=acme, name="train", command="x", gpu_memory_mb=10_000,
                               status=TaskStatus.RUNNING, node=servers[0], max_retries=1)
    Allocation.objects.create(task=task, gpu=servers[0].gpus.first(), node=servers[0], memory_mb=10_000)
    task = lifecycle.report_finished(task.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    assert (task.status, task.gpu_memory_mb) == (TaskStatus.PENDING, 12_000)


def test_a_success_after_an_oom_retry_clears_the_failure(assigned, servers):
    lifecycle.report_finished(assigned.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    Task.objects.filter(pk=assigned.pk).update(status=TaskStatus.RUNNING, node=servers[0])
    task = lifecycle.report_finished(assigned.pk, node_id=servers[0].pk, exit_code=0, actor="agent:gpu-01")
    assert (task.status, task.failure_reason) == (TaskStatus.SUCCEEDED, "")
