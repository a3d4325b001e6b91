"""EASY backfill, preemption and reclaim of borrowed GPUs in the placement core."""

from __future__ import annotations

from scheduling.placement import schedule
from tests.core_factory import node, occupy, snapshot, task, tenant

CRITICAL, HIGH, NORMAL, LOW = 3, 2, 1, 0


def placed(plan) -> dict[int, tuple[int, tuple[int, ...]]]:
    return {p.task_id: (p.node_id, p.gpu_ids) for p in plan.placements}


def half_busy_server():
    """Server 1: GPUs 0-3 held for another hour; GPUs 4-7 free."""
    nodes = [node(1, 8)]
    return nodes, [occupy(nodes, 90, 1, [0, 1, 2, 3], ends_in_s=3600)]


# ---------------------------------------------------------------- backfill


def test_a_short_task_that_ends_before_the_reservation_backfills():
    nodes, running = half_busy_server()
    plan = schedule(snapshot(nodes, [task(12, gpus=8, priority=HIGH), task(13, timeout_s=1800)], running=running))
    assert list(placed(plan)) == [13]
    assert plan.pending[12].reason.startswith("no server has 8 free GPUs with 10 GB; best has 3")


def test_a_long_task_on_reserved_gpus_would_delay_the_head_and_waits():
    nodes, running = half_busy_server()
    plan = schedule(snapshot(nodes, [task(12, gpus=8, priority=HIGH), task(13, timeout_s=7200)], running=running))
    assert plan.placements == []
    assert plan.pending[13].reason == "reserved for backfill: would delay task #12"
    assert (plan.pending[12].position, plan.pending[13].position) == (1, 2)


def test_a_long_task_may_use_gpus_the_reservation_does_not_need():
    nodes, running = half_busy_server()
    nodes.append(node(2, 2))
    plan = schedule(snapshot(nodes, [task(12, gpus=8, priority=HIGH), task(13, timeout_s=7200)], running=running))
    assert placed(plan) == {13: (2, (200,))}


def test_the_head_reservation_replays_running_task_ends_to_find_its_earliest_start():
    nodes = [node(1, 8), node(2, 8)]
    running = [occupy(nodes, 90, 1, [0, 1, 2, 3, 4, 5, 6, 7], ends_in_s=7200),
               occupy(nodes, 91, 2, [0, 1, 2, 3], ends_in_s=600)]
    # Server 2 frees up in 10 minutes, server 1 in two hours: the head is promised server 2, so a
    # 20-minute task may not take server 2's free GPUs but would be allowed to end before 10 minutes.
    pending = [task(12, gpus=8, priority=HIGH), task(13, timeout_s=1200), task(14, timeout_s=300, age_s=-1)]
    plan = schedule(snapshot(nodes, pending, running=running))
    assert placed(plan) == {14: (2, (204,))}
    assert plan.pending[13].reason == "reserved for backfill: would delay task #12"
    assert "gpu-02" in plan.pending[12].reason


def test_without_backfill_nothing_jumps_a_task_blocked_by_capacity():
    nodes, running = half_busy_server()
    pending = [task(12, gpus=8, priority=HIGH), task(13, timeout_s=60), task(14, timeout_s=60, age_s=-1)]
    plan = schedule(snapshot(nodes, pending, running=running, backfill=False))
    assert plan.placements == []
    assert plan.pending[13].reason == "waiting behind 1 higher-priority task"
    assert plan.pending[14].reason == "waiting behind 2 earlier tasks in the queue (1 of higher priority)"


def test_without_backfill_a_task_blocked_by_constraints_or_quota_blocks_nobody():
    nodes = [node(1, 2)]
    tenants = [tenant(1, "acme", max_gpus=0), tenant(2, "globex")]
    pending = [task(1, gpus=4, priority=CRITICAL, tenant_id=2),  # no server has 4 GPUs
               task(2, priority=HIGH, tenant_id=1),  # quota
               task(3, tenant_id=2)]
    plan = schedule(snapshot(nodes, pending, tenants=tenants, backfill=False))
    assert list(placed(plan)) == [3]


# ---------------------------------------------------------------- preemption


def full_of_low_batch():
    nodes = [node(1, 4), node(2, 4)]
    running = [occupy(nodes, 90, 1, [0, 1], priority=LOW),
               occupy(nodes, 91, 1, [2], priority=LOW),
               occupy(nodes, 92, 1, [3], priority=LOW),
               occupy(nodes, 93, 2, [0, 1, 2, 3], priority=NORMAL)]
    return nodes, running


def test_preemption_is_off_by_default():
    nodes, running = full_of_low_batch()
    plan = schedule(snapshot(nodes, [task(1, priority=CRITICAL)], running=running))
    assert plan.preemptions == [] and plan.placements == []


def test_a_critical_task_preempts_the_fewest_newest_low_batch_tasks_on_one_server():
    nodes, running = full_of_low_batch()
    plan = schedule(snapshot(nodes, [task(1, gpus=2, priority=CRITICAL)], running=running,
                             preemption=("CRITICAL",)))
    # Task 90 alone frees 2 GPUs; the newer 92 and 91 would be two victims.
    assert [(p.task_id, p.by_task_id) for p in plan.preemptions] == [(90, 1)]
    assert plan.preemptions[0].reason == "preempted by CRITICAL task #1"
    assert placed(plan) == {1: (1, (100, 101))}


def test_among_equal_victims_the_newest_is_preempted():
    nodes, running = full_of_low_batch()
    plan = schedule(snapshot(nodes, [task(1, priority=CRITICAL)], running=running, preemption=("CRITICAL",)))
    assert [p.task_id for p in plan.preemptions] == [92]  # the newest; freeing one GPU is enough
    assert placed(plan) == {1: (1, (103,))}


def test_only_low_batch_tasks_can_be_preempted():
    nodes = [node(1, 2)]
    running = [occupy(nodes, 90, 1, [0], priority=NORMAL), occupy(nodes, 91, 1, [1], priority=LOW, cls="online")]
    plan = schedule(snapshot(nodes, [task(1, priority=CRITICAL)], running=running, preemption=("CRITICAL",)))
    assert plan.preemptions == [] and plan.placements == []


def test_a_priority_not_listed_in_the_config_does_not_preempt():
    nodes, running = full_of_low_batch()
    plan = schedule(snapshot(nodes, [task(1, priority=HIGH)], running=running, preemption=("CRITICAL",)))
    assert plan.preemptions == []


def test_preempted_capacity_counts_back_into_the_victims_tenant_usage():
    nodes, running = full_of_low_batch()
    tenants = [tenant(1, "acme", max_gpus=8, used_gpus=8, running=4), tenant(2, "globex")]
    # acme's LOW task 92 is preempted for globex; acme's next task then fits its quota again... but not the GPUs.
    pending = [task(1, priority=CRITICAL, tenant_id=2), task(2, priority=NORMAL, tenant_id=1)]
    plan = schedule(snapshot(nodes, pending, running=running, tenants=tenants, preemption=("CRITICAL",)))
    assert [p.task_id for p in plan.preemptions] == [92]
    assert plan.pending[2].reason.startswith("no server has 1 free GPU")


# ---------------------------------------------------------------- borrowing


def test_borrowed_gpus_are_reclaimed_first_when_the_owning_class_needs_its_share():
    nodes = [node(1, 4)]
    running = [occupy(nodes, 90, 1, [0, 1], cls="batch", priority=NORMAL),
               occupy(nodes, 91, 1, [2], cls="batch", priority=NORMAL),
               occupy(nodes, 92, 1, [3], cls="batch", priority=NORMAL)]
    plan = schedule(snapshot(nodes, [task(1, cls="online", priority=NORMAL)], running=running,
                             online_share=0.5, batch_share=0.5, allow_borrowing=True))
    assert [(p.task_id, p.reason) for p in plan.preemptions] == [
        (92, "borrowed batch GPUs reclaimed for online task #1")]
    assert placed(plan) == {1: (1, (103,))}


def test_without_borrowing_nothing_is_reclaimed():
    nodes = [node(1, 4)]
    running = [occupy(nodes, 90, 1, [0, 1, 2, 3], cls="batch")]
    plan = schedule(snapshot(nodes, [task(1, cls="online")], running=running, online_share=0.5, batch_share=0.5))
    assert plan.preemptions == [] and plan.placements == []


def test_a_class_within_its_own_share_is_not_reclaimed_from():
    nodes = [node(1, 4)]
    running = [occupy(nodes, 90, 1, [0, 1], cls="batch"), occupy(nodes, 91, 1, [2, 3], cls="online")]
    plan = schedule(snapshot(nodes, [task(1, cls="online")], running=running, online_share=0.5, batch_share=0.5,
                             allow_borrowing=True))
    assert plan.preemptions == []
    assert plan.pending[1].reason.startswith("online share of the cluster full (50%): 2/2 GPUs in use")


def test_the_reservation_does_not_count_on_memory_held_by_processes_it_does_not_know():
    # GPU 0 carries 30 GB of memory no task claims (a stray process): a task placed on it in this
    # pass will free only its own 10 GB, so a 60 GB head can never start there and reserves nothing.
    nodes = [node(1, 1, live=30_000)]
    pending = [task(1, memory=10_000, exclusive=False, timeout_s=60), task(2, memory=60_000, exclusive=False)]
    plan = schedule(snapshot(nodes, pending, memory_safety_margin_mb=0))
    assert list(placed(plan)) == [1]
    assert "reserved" not in plan.pending[2].reason


def test_waiting_counts_only_tasks_blocked_by_capacity_ahead():
    nodes, running = half_busy_server()
    tenants = [tenant(1, "acme"), tenant(2, "globex", max_gpus=0)]
    pending = [task(12, gpus=8, priority=HIGH), task(13, priority=HIGH, tenant_id=2, age_s=-1),
               task(14, timeout_s=60)]
    plan = schedule(snapshot(nodes, pending, running=running, tenants=tenants, backfill=False))
    assert plan.pending[13].reason == "tenant globex at its GPU quota (0/0)"
    assert plan.pending[14].reason == "waiting behind 1 higher-priority task"
    assert [plan.pending[i].position for i in (12, 13, 14)] == [1, 2, 3]


def test_preemption_does_not_take_gpus_promised_to_the_backfill_head():
    # Server 1 is promised to the 8-GPU head in two hours; a later CRITICAL task that would outlive
    # that may still preempt LOW batch work, but only on server 2.
    nodes = [node(1, 8), node(2, 2)]
    running = [occupy(nodes, 90, 1, [0, 1, 2, 3], priority=NORMAL, ends_in_s=3600),
               occupy(nodes, 91, 1, [4], priority=LOW, ends_in_s=7200),
               occupy(nodes, 92, 2, [0, 1], priority=LOW, ends_in_s=7200)]
    pending = [task(12, gpus=4, priority=CRITICAL, age_s=10, gpu_model="nothing-like-it"),  # never fits
               task(13, gpus=8, priority=CRITICAL, age_s=5, tenant_id=1),
               task(14, priority=CRITICAL, timeout_s=9000)]
    plan = schedule(snapshot(nodes, pending, running=running, preemption=("CRITICAL",)))
    # Task 13 needs all of server 1: preempting LOW task 91 is not enough (90 is NORMAL), so it reserves.
    assert "next in line" in plan.pending[13].reason
    assert [(p.task_id, p.by_task_id) for p in plan.preemptions] == [(92, 14)]
    assert placed(plan)[14][0] == 2


def test_placements_are_reported_as_decided_until_the_first_preemption():
    nodes, running = full_of_low_batch()
    nodes.append(node(3, 2))
    reported = []
    plan = schedule(snapshot(nodes, [task(2, priority=CRITICAL, age_s=30), task(1, gpus=2, priority=CRITICAL, age_s=20),
                                     task(4, priority=CRITICAL, age_s=10)], running=running,
                             preemption=("CRITICAL",)), on_place=reported.append)
    assert [(p.task_id, p.by_task_id) for p in plan.preemptions] == [(90, 1)]
    assert set(placed(plan)) == {1, 2, 4}
    # Task 1 needs the GPUs the preemption frees, and whatever comes after it is written with the plan.
    assert [p.task_id for p in reported] == [2]
