"""The database itself refuses to give one GPU to two tasks, whatever Python does."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from scheduling.choices import ShareMode
from scheduling.models import Allocation, Task


def _task(tenant, name="t", **kw) -> Task:
    return Task.objects.create(tenant=tenant, name=name, command="true", **kw)


def _allocate(task, gpu, *, exclusive=True, memory_mb=1000) -> Allocation:
    return Allocation.objects.create(task=task, gpu=gpu, node=gpu.node, memory_mb=memory_mb, exclusive=exclusive)


def test_it_never_gives_one_gpu_to_two_exclusive_tasks(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    _allocate(_task(acme, "first"), gpu)
    with pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic():
        _allocate(_task(acme, "second"), gpu)
    assert Allocation.objects.filter(gpu=gpu, released_at__isnull=True).count() == 1


def test_bulk_create_cannot_sneak_a_second_exclusive_allocation_in(acme, servers):
    gpu = servers[0].gpus.get(index=1)
    a, b = _task(acme, "a"), _task(acme, "b")
    with pytest.raises(IntegrityError), transaction.atomic():
        Allocation.objects.bulk_create([
            Allocation(task=a, gpu=gpu, node=gpu.node, memory_mb=1, exclusive=True),
            Allocation(task=b, gpu=gpu, node=gpu.node, memory_mb=1, exclusive=True),
        ])
    assert not Allocation.objects.exists()


def test_a_released_allocation_frees_the_gpu_for_the_next_task(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    first = _allocate(_task(acme, "first"), gpu)
    first.released_at = timezone.now()
    first.save()
    _allocate(_task(acme, "second"), gpu)
    assert Allocation.objects.filter(gpu=gpu).count() == 2


def test_shared_tasks_may_share_a_gpu_but_never_beside_an_exclusive_one(acme, servers):
    gpu = servers[0].gpus.get(index=2)
    _allocate(_task(acme, "s1", share_mode=ShareMode.SHARED), gpu, exclusive=False)
    _allocate(_task(acme, "s2", share_mode=ShareMode.SHARED), gpu, exclusive=False)
    with pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic():
        _allocate(_task(acme, "x"), gpu, exclusive=True)


def test_a_task_holds_a_gpu_at_most_once(acme, servers):
    gpu = servers[0].gpus.get(index=3)
    task = _task(acme, share_mode=ShareMode.SHARED)
    _allocate(task, gpu, exclusive=False)
    with pytest.raises(IntegrityError, match="allocation_one_active_per_task_gpu"), transaction.atomic():
        _allocate(task, gpu, exclusive=False)


@pytest.mark.parametrize(
    ("field", "value", "constraint"),
    [
        ("gpu_count", 0, "task_gpu_count_positive"),
        ("priority", 7, "task_priority_valid"),
        ("status", "exploded", "task_status_valid"),
        ("workload_class", "realtime", "task_workload_class_valid"),
        ("nodes", 3, "task_nodes_within_gpu_count"),  # a gang has at least one GPU per server
    ],
)
def test_the_database_rejects_impossible_task_values(acme, field, value, constraint):
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        _task(acme, **{field: value})
