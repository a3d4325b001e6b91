"""The snapshot reuses the previous load's GPU objects only for rows that did not change
(scheduling.passes._load_gpus): every change to a GPU or its allocations is seen."""

from __future__ import annotations

import pytest
from django.utils import timezone

from nodes.models import GPU
from scheduling.models import Allocation, Task
from scheduling.passes import load_snapshot, run_pass
from tests.conftest import make_server


def gpus_of(loaded) -> dict[int, object]:
    return {g.id: g for n in loaded.snapshot.nodes for g in n.gpus}


def test_unchanged_gpus_are_reused_and_every_change_is_read(acme):
    node = make_server("reuse-1", gpus=4)
    first = gpus_of(load_snapshot(timezone.now()))
    again = gpus_of(load_snapshot(timezone.now()))
    assert list(first) == list(again) and all(again[i] is first[i] for i in first)

    g0, g1, g2, g3 = node.gpus.order_by("index")
    GPU.objects.filter(pk=g0.pk).update(cordoned=True)
    GPU.objects.filter(pk=g1.pk).update(memory_used_mb=1_234, utilization_pct=77)
    task = Task.objects.create(tenant=acme, name="holder", command="true", status="running", node=node)
    Allocation.objects.create(task=task, gpu=g2, node=node, memory_mb=5_000, exclusive=False)
    GPU.objects.filter(pk=g3.pk).update(loaded_models={"llama": timezone.now().isoformat()})
    changed = gpus_of(load_snapshot(timezone.now()))
    assert changed[g0.pk].schedulable is False
    assert (changed[g1.pk].memory_used_live_mb, changed[g1.pk].utilization_pct) == (1_234, 77)
    assert (changed[g2.pk].memory_claimed_mb, changed[g2.pk].shared_count) == (5_000, 1)
    assert "llama" in changed[g3.pk].loaded_models
    assert all(changed[g.pk] is not first[g.pk] for g in (g0, g1, g2))

    # Back as it was: equal content, read as such.
    GPU.objects.filter(pk=g0.pk).update(cordoned=False)
    assert gpus_of(load_snapshot(timezone.now()))[g0.pk].schedulable is True


def test_a_pass_after_a_pass_places_on_what_changed_between_them(acme):
    node = make_server("reuse-2", gpus=1)
    first = Task.objects.create(tenant=acme, name="a", command="true", gpu_memory_mb=10_000,
                                workload_class="online")
    result = run_pass()
    assert result.placements == 1, Task.objects.get(pk=first.pk).pending_reason
    second = Task.objects.create(tenant=acme, name="b", command="true", gpu_memory_mb=10_000,
                                 workload_class="online")
    assert run_pass().placements == 0  # the only GPU is taken (exclusive), as the reused snapshot must know
    Allocation.objects.filter(task=first).update(released_at=timezone.now())
    Task.objects.filter(pk=first.pk).update(status="succeeded")
    assert run_pass().placed_task_ids == [second.pk]
    assert Allocation.objects.get(task=second).gpu.node_id == node.pk


def test_changes_undone_by_a_rolled_back_savepoint_are_read_back(acme):
    """What-if and tests read their own uncommitted writes: a GPU changed inside a savepoint and
    rolled back is its old self again in the next load, never the changed object kept."""
    from django.db import transaction

    node = make_server("reuse-2", gpus=2)
    g0 = node.gpus.order_by("index").first()
    load_snapshot(timezone.now())
    with pytest.raises(RuntimeError), transaction.atomic():
        GPU.objects.filter(pk=g0.pk).update(cordoned=True)
        assert gpus_of(load_snapshot(timezone.now()))[g0.pk].schedulable is False
        raise RuntimeError("roll back")
    assert gpus_of(load_snapshot(timezone.now()))[g0.pk].schedulable is True
    # And the same change made again, in a new savepoint, is read again; so is its undoing by
    # the same transaction (one xid for both row versions: the command id tells them apart).
    with transaction.atomic():
        GPU.objects.filter(pk=g0.pk).update(cordoned=True)
        assert gpus_of(load_snapshot(timezone.now()))[g0.pk].schedulable is False
        GPU.objects.filter(pk=g0.pk).update(cordoned=False)
        assert gpus_of(load_snapshot(timezone.now()))[g0.pk].schedulable is True
