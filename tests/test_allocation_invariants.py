"""The database itself refuses to give one GPU to two tasks, whatever Python does."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
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


def _checked_now() -> None:
    # The key is deferred to commit, like Django's; a test's transaction never commits.
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_an_allocation_is_recorded_on_its_gpus_own_server(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    with pytest.raises(IntegrityError, match="allocation_gpu_on_its_server"), transaction.atomic():
        Allocation.objects.create(task=_task(acme), gpu=gpu, node=servers[1], memory_mb=1)
        _checked_now()
    assert not Allocation.objects.exists()


@pytest.mark.parametrize("missing", ["gpu", "node"])
def test_an_allocation_names_a_gpu_and_server_that_exist(acme, servers, missing):
    gpu = servers[0].gpus.get(index=0)
    ids = {"gpu_id": gpu.pk, "node_id": gpu.node_id, f"{missing}_id": 10**9}
    with pytest.raises(IntegrityError, match="allocation_gpu_on_its_server"), transaction.atomic():
        Allocation.objects.create(task=_task(acme), memory_mb=1, **ids)
        _checked_now()


def test_a_gpu_that_held_an_allocation_cannot_move_or_go(acme, servers):
    # The history says where each allocation ran; the ORM's PROTECT is not the only guard.
    gpu = servers[0].gpus.get(index=0)
    _allocate(_task(acme), gpu)
    for statement in ("UPDATE nodes_gpu SET node_id = %s WHERE id = %s", "DELETE FROM nodes_gpu WHERE id = %s"):
        params = [servers[1].pk, gpu.pk] if statement.startswith("UPDATE") else [gpu.pk]
        with pytest.raises(IntegrityError, match="allocation_gpu_on_its_server"), transaction.atomic():
            with connection.cursor() as cursor:
                # The GPU's (node, index) must stay unique on the other server.
                cursor.execute("UPDATE nodes_gpu SET index = 99 WHERE id = %s", [gpu.pk])
                cursor.execute(statement, params)
            _checked_now()
    gpu.refresh_from_db()
    assert gpu.node_id == servers[0].pk


def test_model_validation_reports_a_gpu_on_another_server(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    allocation = Allocation(task=_task(acme), gpu=gpu, node=servers[1], memory_mb=1)
    with pytest.raises(ValidationError, match="allocation_gpu_on_its_server"):
        allocation.full_clean()
    allocation.node = servers[0]
    allocation.full_clean()


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
