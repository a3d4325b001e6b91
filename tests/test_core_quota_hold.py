"""A wide task blocked by its own tenant's quota is not starved by that tenant's narrower tasks."""

from __future__ import annotations

from scheduling.placement import schedule
from tests.core_factory import node, occupy, snapshot, task, tenant

LONG = 3 * 3600  # still running when the wide task could start


def acme_at_6_of_8():
    """Two servers, plenty of room; acme (quota 8 GPUs) holds 6: 2 GPUs for 1 h, 4 GPUs for 2 h."""
    nodes = [node(1, 8), node(2, 8)]
    running = [occupy(nodes, 90, 1, [0, 1], ends_in_s=3600), occupy(nodes, 91, 1, [2, 3, 4, 5], ends_in_s=7200)]
    acme = tenant(1, "acme", max_gpus=8, used_gpus=6, used_mem=6 * 80_000, running=2)
    return nodes, running, acme


def test_later_narrow_tasks_of_the_tenant_cannot_take_the_headroom_the_wide_task_waits_for():
    nodes, running, acme = acme_at_6_of_8()
    wide = task(1, gpus=8, age_s=30)
    narrow = [task(2, gpus=1, timeout_s=LONG, age_s=20), task(3, gpus=2, timeout_s=LONG, age_s=10)]
    plan = schedule(snapshot(nodes, [wide, *narrow], tenants=[acme], running=running))
    assert plan.placements == []
    assert plan.pending[1].reason == "tenant acme near its GPU quota (6/8); this task needs 8 more"
    for t in (2, 3):
        assert plan.pending[t].reason.startswith("held for task #1 of the same tenant: it waits for quota")


def test_a_narrow_task_that_ends_before_the_wide_one_can_start_still_runs():
    nodes, running, acme = acme_at_6_of_8()
    # The wide task can start once both running tasks end (in 2 h); a 90-minute task is gone by then.
    plan = schedule(snapshot(nodes, [task(1, gpus=8, age_s=30), task(2, gpus=2, timeout_s=5400, age_s=10)],
                             tenants=[acme], running=running))
    assert [p.task_id for p in plan.placements] == [2]


def test_headroom_the_wide_task_will_not_need_can_still_be_used():
    nodes, running, _ = acme_at_6_of_8()
    acme = tenant(1, "acme", max_gpus=12, used_gpus=6, used_mem=6 * 80_000, running=2)
    # Quota 12: the 8-GPU task can start when the 2-GPU task ends (6 - 2 + 8 = 12), with no
    # headroom to spare then; the other tenant's task is not held, only acme's own.
    other = tenant(2, "globex", max_gpus=100)
    plan = schedule(snapshot(nodes, [task(1, gpus=8, age_s=30), task(2, gpus=2, timeout_s=LONG, age_s=20),
                                     task(3, tenant_id=2, gpus=2, timeout_s=LONG, age_s=10)],
                             tenants=[acme, other], running=running))
    assert [p.task_id for p in plan.placements] == [3]
    assert plan.pending[2].reason.startswith("held for task #1")


def test_spare_headroom_at_the_wide_tasks_start_is_shared_out_once():
    nodes = [node(1, 8), node(2, 8)]
    running = [occupy(nodes, 90, 1, [0, 1, 2, 3], ends_in_s=3600)]
    # Quota 10, holding 4: an 8-GPU task needs the 4 back (at T = 1 h); beside it 2 GPUs stay spare.
    acme = tenant(1, "acme", max_gpus=10, used_gpus=4, used_mem=4 * 80_000, running=1)
    queue = [task(1, gpus=8, age_s=30), task(2, gpus=1, timeout_s=LONG, age_s=20),
             task(3, gpus=1, timeout_s=LONG, age_s=15), task(4, gpus=1, timeout_s=LONG, age_s=10)]
    plan = schedule(snapshot(nodes, queue, tenants=[acme], running=running))
    assert sorted(p.task_id for p in plan.placements) == [2, 3]
    assert plan.pending[4].reason.startswith("held for task #1")


def test_a_higher_priority_task_of_the_tenant_is_not_held_by_a_lower_priority_wide_one():
    nodes, running, acme = acme_at_6_of_8()
    queue = [task(1, gpus=8, priority=0, age_s=30), task(2, gpus=2, priority=2, timeout_s=LONG, age_s=10)]
    plan = schedule(snapshot(nodes, queue, tenants=[acme], running=running))
    assert [p.task_id for p in plan.placements] == [2]


def test_a_task_its_quota_can_never_hold_protects_nothing():
    nodes, running, acme = acme_at_6_of_8()
    plan = schedule(snapshot(nodes, [task(1, gpus=16, age_s=30), task(2, gpus=2, timeout_s=LONG, age_s=10)],
                             tenants=[acme], running=running))
    assert [p.task_id for p in plan.placements] == [2]
