"""Fair share in the placement core: within a priority level, the tenant further below its share goes first."""

from __future__ import annotations

import dataclasses

from scheduling.placement import schedule
from tests.core_factory import node, snapshot, task, tenant


def one_free_gpu_race(fair_share: bool, heavy_factor: float = 0.1, light_factor: float = 0.9):
    tenants = [tenant(1, "heavy", max_gpus=100), tenant(2, "light", max_gpus=100)]
    tenants[0].fair_share, tenants[1].fair_share = heavy_factor, light_factor
    # One free GPU; heavy submitted first, light later, same priority.
    pending = [task(1, tenant_id=1, gpus=1, age_s=60), task(2, tenant_id=2, gpus=1, age_s=10)]
    snap = snapshot([node(1, 1)], pending, tenants=tenants)
    return dataclasses.replace(snap, config=dataclasses.replace(snap.config, fair_share=fair_share))


def test_off_by_default_the_queue_stays_fifo():
    plan = schedule(one_free_gpu_race(fair_share=False))
    assert [p.task_id for p in plan.placements] == [1]


def test_on_the_tenant_with_the_higher_factor_goes_first_and_the_other_is_told_why():
    plan = schedule(one_free_gpu_race(fair_share=True))
    assert [p.task_id for p in plan.placements] == [2]
    reason = plan.pending[1].reason
    assert reason.startswith("no server has 1 free GPU")
    assert reason.endswith("fair share: tasks of tenants with a higher factor went first (tenant heavy: 0.10)")


def test_priority_still_comes_before_fair_share():
    snap = one_free_gpu_race(fair_share=True)
    snap.pending[0].priority = 2
    plan = schedule(snap)
    assert [p.task_id for p in plan.placements] == [1]
    assert "fair share" not in plan.pending[2].reason


def test_equal_factors_fall_back_to_fifo():
    plan = schedule(one_free_gpu_race(fair_share=True, heavy_factor=0.5, light_factor=0.5))
    assert [p.task_id for p in plan.placements] == [1]
    assert "fair share" not in plan.pending[2].reason
