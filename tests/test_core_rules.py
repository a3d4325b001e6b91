"""The placement core's rules, one behaviour per test (pure Python, no database)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduling.placement import schedule
from scheduling.placement.scoring import static_score_steady
from tests.core_factory import NOW, gpu, node, occupy, snapshot, task, tenant

CRITICAL, HIGH, NORMAL, LOW = 3, 2, 1, 0


def placed(plan) -> dict[int, tuple[int, tuple[int, ...]]]:
    return {p.task_id: (p.node_id, p.gpu_ids) for p in plan.placements}


# ---------------------------------------------------------------- order


def test_higher_priority_tasks_are_placed_first_whatever_the_submission_order():
    nodes = [node(1, 1)]
    plan = schedule(snapshot(nodes, [task(1, priority=LOW, age_s=100), task(2, priority=CRITICAL),
                                     task(3, priority=NORMAL, age_s=50)], backfill=False))
    assert list(placed(plan)) == [2]
    assert plan.pending[3].position == 1 and plan.pending[1].position == 2


def test_tasks_of_one_priority_are_placed_first_come_first_served():
    nodes = [node(1, 1)]
    plan = schedule(snapshot(nodes, [task(7, age_s=10), task(5, age_s=30), task(6, age_s=30)]))
    assert list(placed(plan)) == [5]  # oldest; equal times fall back to the id
    assert (plan.pending[6].position, plan.pending[7].position) == (1, 2)


# ---------------------------------------------------------------- quotas


def test_a_tenant_at_its_gpu_quota_waits_with_the_counts_in_the_reason():
    plan = schedule(snapshot([node(1)], [task(1, gpus=2)], tenants=[tenant(max_gpus=8, used_gpus=8)]))
    assert plan.placements == []
    assert plan.pending[1].reason == "tenant acme at its GPU quota (8/8)"


def test_a_tenant_at_its_running_task_quota_waits():
    plan = schedule(snapshot([node(1)], [task(1)], tenants=[tenant(max_tasks=4, running=4)]))
    assert plan.pending[1].reason == "tenant acme at its running-task quota (4/4)"


def test_a_tenant_at_its_gpu_memory_quota_waits():
    plan = schedule(snapshot([node(1)], [task(1, gpus=2, memory=30_000)],
                             tenants=[tenant(max_mem=100_000, used_mem=50_000)]))
    assert plan.pending[1].reason.startswith("tenant acme near its GPU memory quota (50 GB/100 GB)")


def test_quota_usage_grows_with_each_placement_in_the_same_pass():
    plan = schedule(snapshot([node(1), node(2)], [task(i, gpus=2, age_s=10 - i) for i in range(1, 6)],
                             tenants=[tenant(max_gpus=6)]))
    assert sorted(placed(plan)) == [1, 2, 3]
    assert plan.pending[4].reason == "tenant acme at its GPU quota (6/6)"


def test_a_task_blocked_by_its_own_tenant_quota_does_not_block_other_tenants():
    tenants = [tenant(1, "acme", max_gpus=0), tenant(2, "globex")]
    plan = schedule(snapshot([node(1, 2)], [task(1, tenant_id=1, priority=CRITICAL), task(2, tenant_id=2)],
                             tenants=tenants, backfill=False))
    assert list(placed(plan)) == [2]


def test_the_online_share_caps_online_tasks_at_seventy_percent_of_the_cluster():
    nodes = [node(1, 10, total=80_000)]
    pending = [task(i, cls="online", age_s=100 - i) for i in range(1, 10)]
    plan = schedule(snapshot(nodes, pending, online_share=0.7, batch_share=0.3))
    assert len(plan.placements) == 7
    assert plan.pending[8].reason.startswith("online share of the cluster full (70%): 7/7 GPUs in use")


def test_the_split_is_strict_by_default_even_when_the_other_share_is_idle():
    plan = schedule(snapshot([node(1, 10)], [task(i, cls="batch", age_s=10 - i) for i in range(1, 6)],
                             online_share=0.7, batch_share=0.3))
    assert len(plan.placements) == 3
    assert plan.pending[4].reason.startswith("batch share of the cluster full (30%)")


def test_with_borrowing_a_class_uses_the_other_class_idle_share():
    plan = schedule(snapshot([node(1, 10)], [task(i, cls="batch", age_s=10 - i) for i in range(1, 6)],
                             online_share=0.7, batch_share=0.3, allow_borrowing=True))
    assert len(plan.placements) == 5


# ---------------------------------------------------------------- fit


def test_used_memory_is_the_larger_of_claimed_and_live():
    nodes = [node(1, 1, total=80_000, claimed=10_000, live=50_000, exclusive_taken=False, shared=1)]
    # 50 GB live + 30 GB + 2 GB margin > 80 GB, although claimed alone would leave room.
    plan = schedule(snapshot(nodes, [task(1, memory=30_000, exclusive=False)]))
    assert plan.placements == []
    plan = schedule(snapshot(nodes, [task(1, memory=28_000, exclusive=False)]))
    assert list(placed(plan)) == [1]


def test_the_safety_margin_is_kept_free_on_every_gpu():
    nodes = [node(1, 1, total=80_000)]
    assert schedule(snapshot(nodes, [task(1, memory=78_001)])).placements == []
    assert len(schedule(snapshot(nodes, [task(1, memory=78_000)])).placements) == 1


def test_a_task_without_memory_needs_a_whole_empty_gpu_and_claims_all_of_it():
    nodes = [node(1, 2, total=80_000)]
    nodes[0].gpus[0].shared_count = 1
    nodes[0].gpus[0].memory_claimed_mb = 1_000
    plan = schedule(snapshot(nodes, [task(1, memory=None, exclusive=False)]))
    (p,) = plan.placements
    assert p.gpu_ids == (101,) and p.memory_mb == 80_000 and p.exclusive


def test_node_selector_must_be_a_subset_of_the_server_labels():
    nodes = [node(1, 2, labels={"zone": "a"}), node(2, 2, labels={"zone": "b", "ib": "yes"})]
    plan = schedule(snapshot(nodes, [task(1, selector={"zone": "b", "ib": "yes"})]))
    assert placed(plan)[1][0] == 2


def test_gpu_model_matches_a_case_insensitive_substring_of_the_model_name():
    nodes = [node(1, 2), node(2, 2, model="NVIDIA A100-SXM4-80GB")]
    plan = schedule(snapshot(nodes, [task(1, gpu_model="a100")]))
    assert placed(plan)[1][0] == 2


def test_a_gpu_model_no_active_server_has_is_named_in_the_reason():
    plan = schedule(snapshot([node(1, 2)], [task(1, gpu_model="A100")]))
    assert plan.pending[1].reason == "no active server has GPUs matching gpu_model 'A100'"


def test_labels_no_active_server_has_are_named_in_the_reason():
    plan = schedule(snapshot([node(1, 2, labels={"zone": "a"})], [task(1, selector={"zone": "z"})]))
    assert plan.pending[1].reason == "no active server has labels zone=z"


def test_a_gang_gets_all_its_gpus_on_one_server_or_none():
    nodes = [node(1, 4), node(2, 4)]
    plan = schedule(snapshot(nodes, [task(1, gpus=6)]))
    assert plan.placements == []
    assert plan.pending[1].reason == "no active server has 6 GPUs; the largest has 4"


def test_a_gang_waits_when_free_gpus_are_spread_over_servers():
    nodes = [node(1, 4), node(2, 4)]
    running = [occupy(nodes, 90, 1, [0]), occupy(nodes, 91, 2, [0])]
    plan = schedule(snapshot(nodes, [task(1, gpus=4, memory=40_000)], running=running))
    assert plan.placements == []
    assert plan.pending[1].reason.startswith("no server has 4 free GPUs with 40 GB; best has 3")


def test_unschedulable_gpus_and_servers_are_skipped():
    nodes = [node(1, 2, schedulable=False), node(2, 2)]
    nodes[1].gpus[0].schedulable = False
    plan = schedule(snapshot(nodes, [task(1), task(2, age_s=-1)]))
    assert placed(plan) == {1: (2, (201,))}
    assert plan.pending[2].reason.startswith("no server has 1 free GPU with 10 GB; best has 0")


def test_exclusive_tasks_never_land_on_a_gpu_with_any_allocation():
    nodes = [node(1, 2)]
    running = [occupy(nodes, 90, 1, [0], memory=1_000, exclusive=False)]
    plan = schedule(snapshot(nodes, [task(1), task(2, age_s=-1)], running=running))
    assert placed(plan) == {1: (1, (101,))}


def test_shared_tasks_pack_onto_one_gpu_while_their_memory_fits():
    nodes = [node(1, 2, total=80_000)]
    pending = [task(i, memory=20_000, exclusive=False, age_s=10 - i) for i in range(1, 5)]
    plan = schedule(snapshot(nodes, pending))
    gpus = [p.gpu_ids for p in plan.placements]
    # 3 x 20 GB + 2 GB margin fit on one 80 GB GPU (binpack fills it before the next).
    assert gpus == [(100,), (100,), (100,), (101,)]
    assert all(not p.exclusive for p in plan.placements)


def test_shared_tasks_never_join_an_exclusive_allocation():
    nodes = [node(1, 1)]
    running = [occupy(nodes, 90, 1, [0], memory=1_000, exclusive=True)]
    plan = schedule(snapshot(nodes, [task(1, memory=1_000, exclusive=False)], running=running))
    assert plan.placements == []


# ---------------------------------------------------------------- score


def test_a_gpu_with_the_model_loaded_wins_over_an_emptier_server():
    nodes = [node(1, 8), node(2, 8)]
    nodes[1].gpus[5].loaded_models = {"deepseek-7b": NOW}
    plan = schedule(snapshot(nodes, [task(1, model="deepseek-7b")]))
    assert placed(plan)[1] == (2, (205,))


def test_a_gpu_with_room_in_its_model_cache_beats_one_whose_cache_is_full():
    n = node(1, 2)
    n.gpus[0].loaded_models = {"a": NOW, "b": NOW}
    plan = schedule(snapshot([n], [task(1, model="c")]))
    assert placed(plan)[1] == (1, (101,))


def test_binpack_fills_the_busiest_server_that_fits_and_keeps_whole_servers_free():
    nodes = [node(1, 8), node(2, 8), node(3, 8)]
    running = [occupy(nodes, 90, 2, [0, 1, 2, 3, 4])]
    plan = schedule(snapshot(nodes, [task(1, gpus=2)], running=running, strategy="binpack"))
    assert placed(plan)[1][0] == 2


def test_spread_places_on_the_least_loaded_server():
    nodes = [node(1, 8), node(2, 8), node(3, 8)]
    running = [occupy(nodes, 90, 1, [0, 1]), occupy(nodes, 91, 3, [0])]
    plan = schedule(snapshot(nodes, [task(1, gpus=2)], running=running, strategy="spread"))
    assert placed(plan)[1][0] == 2


def test_the_load_balance_score_prefers_cool_idle_gpus_within_a_server():
    n = node(1, 2)
    n.gpus[0] = gpu(1, 0, util=90, temp=85, idle_s=None)
    n.gpus[1] = gpu(1, 1, util=0, temp=35, idle_s=3600)
    plan = schedule(snapshot([n], [task(1)]))
    assert placed(plan)[1] == (1, (101,))


def static_score(g, now):
    return static_score_steady(g, now)[0]


def idle_steady(g, now):
    return static_score_steady(g, now)[1:]


def test_idle_time_counts_in_whole_minutes_up_to_an_hour():
    def idle_part(seconds):
        g = gpu(1, 0, util=100, temp=100, idle_s=seconds)
        return static_score(g, NOW)

    assert idle_part(None) == idle_part(-30) == idle_part(0) == idle_part(59.9) == 0.0
    assert idle_part(60) == idle_part(119) == pytest.approx(10.0 / 60)
    assert idle_part(3599) == pytest.approx(10.0 * 59 / 60)
    assert idle_part(3600) == idle_part(86_400) == 10.0
    # Between two GPUs idle within the same minute, the lower index wins (a tie), not the older.
    n = node(1, 2)
    n.gpus[0] = gpu(1, 0, idle_s=610)
    n.gpus[1] = gpu(1, 1, idle_s=650)
    assert placed(schedule(snapshot([n], [task(1)])))[1] == (1, (100,))


def test_an_idle_score_holds_between_minute_boundaries():
    g = gpu(1, 0, idle_s=630)
    lo, hi = idle_steady(g, NOW)
    assert (lo - g.idle_since, hi - g.idle_since) == (timedelta(minutes=10), timedelta(minutes=11))
    assert static_score(g, lo) == static_score(g, NOW) == static_score(g, hi - timedelta(microseconds=1))
    assert static_score(g, lo - timedelta(microseconds=1)) < static_score(g, NOW) < static_score(g, hi)
    assert idle_steady(gpu(1, 0, idle_s=30), NOW) == (None, NOW + timedelta(seconds=30))
    assert idle_steady(gpu(1, 0, idle_s=3600), NOW) == (NOW, None)
    assert idle_steady(gpu(1, 0, idle_s=None), NOW) == (None, None)


@given(util=st.integers(-50, 150), temp=st.integers(-50, 150),
       idle_us=st.none() | st.integers(-10**10, 10**10) | st.integers(3_599_999_990, 3_600_000_010))
def test_the_static_score_is_the_documented_formula_and_holds_between_its_bounds(util, temp, idle_us):
    g = gpu(1, 0, util=util, temp=temp, idle_s=None)
    g.idle_since = None if idle_us is None else NOW - timedelta(microseconds=idle_us)
    minutes = 0 if idle_us is None or idle_us <= 0 else min(idle_us // 60_000_000, 60)
    clamp = lambda value: min(max(value, 0), 100) / 100.0  # noqa: E731
    score, lo, hi = static_score_steady(g, NOW)
    assert score == 30.0 * (1.0 - clamp(util)) + 20.0 * (1.0 - clamp(temp)) + 10.0 * minutes / 60
    if idle_us is None:
        assert (lo, hi) == (None, None)
        return
    assert lo is None or (lo <= NOW and static_score(g, lo) == score > static_score(g, lo - timedelta(microseconds=1)))
    assert hi is None or (hi > NOW and static_score(g, hi - timedelta(microseconds=1)) == score < static_score(g, hi))
    assert (lo is None) == (minutes == 0) and (hi is None) == (minutes == 60)


def test_the_input_snapshot_is_not_modified():
    nodes = [node(1, 2)]
    snap = snapshot(nodes, [task(1, model="m")])
    schedule(snap)
    g = snap.nodes[0].gpus
    assert (g[0].memory_claimed_mb, g[0].exclusive_taken, g[0].loaded_models) == (0, False, {})


# ---------------------------------------------------------------- reasons


def test_a_request_bigger_than_any_gpu_names_the_memory_and_the_margin():
    plan = schedule(snapshot([node(1, 8)], [task(1, memory=79_000)]))
    assert plan.pending[1].reason == (
        "no active server has 1 GPU with 79 GB + the 2 GB safety margin; the best has 0")


def test_a_request_that_only_fits_an_idle_gpu_with_no_driver_memory_can_never_fit():
    # 78,000 + 2,000 fits the 80,000 on paper, but an idle GPU already uses 512 MB.
    plan = schedule(snapshot([node(1, 2, live=512)], [task(1, memory=78_000)]))
    assert plan.pending[1].never_fits
    assert plan.pending[1].reason == ("no active server has 1 GPU with 78 GB + the 2 GB safety margin "
                                      "(idle GPUs already use up to 512 MB); the best has 0")


def test_a_task_that_waits_for_busy_gpus_is_not_told_it_can_never_fit():
    nodes = [node(1, 1, live=512)]
    running = [occupy(nodes, 90, 1, [0])]
    plan = schedule(snapshot(nodes, [task(1, memory=70_000)], running=running))
    assert plan.pending[1].reason.startswith("no server has 1 free GPU") and not plan.pending[1].never_fits


def test_a_capacity_reason_names_the_constraints_it_was_searched_with():
    nodes = [node(1, 2, labels={"zone": "a"})]
    running = [occupy(nodes, 90, 1, [0, 1])]
    plan = schedule(snapshot(nodes, [task(1, selector={"zone": "a"}, gpu_model="H100")], running=running))
    assert plan.pending[1].reason == (
        "no server has 1 free GPU with 10 GB (labels zone=a; gpu_model 'H100'); best has 0; "
        "next in line: GPUs reserved on gpu-01, free by 2026-01-01 13:00 UTC at the latest")


def test_a_whole_gpu_task_is_checked_against_the_memory_quota_at_the_gpu_size():
    plan = schedule(snapshot([node(1, 2)], [task(1, memory=None)], tenants=[tenant(max_mem=50_000)]))
    assert plan.placements == []
    assert plan.pending[1].reason == (
        "tenant acme near its GPU memory quota (0 MB/50 GB); this task needs 80 GB more")


def test_a_task_of_a_tenant_without_a_quota_row_is_not_limited():
    plan = schedule(snapshot([node(1, 2)], [task(1, tenant_id=99, gpus=2)]))
    assert len(plan.placements) == 1


def test_a_very_long_reason_is_cut_to_what_the_task_row_holds():
    selector = {f"label{i}": "x" * 20 for i in range(40)}
    plan = schedule(snapshot([node(1, 1)], [task(1, selector=selector)]))
    assert 0 < len(plan.pending[1].reason) <= 500


def test_placements_record_their_score():
    plan = schedule(snapshot([node(1, 1)], [task(1, model="m")]))
    assert plan.placements[0].score > 50  # +50 for the empty model cache, plus load balance


def test_a_class_share_counts_every_task_on_a_shared_gpu():
    # One GPU: the online share (70%) rounds to 1 GPU, and two shared tasks on it count as 2.
    pending = [task(1, cls="online", exclusive=False, memory=1_000), task(2, cls="online", exclusive=False,
                                                                          memory=1_000, age_s=-1)]
    plan = schedule(snapshot([node(1, 1)], pending, online_share=0.7, batch_share=0.3))
    assert list(placed(plan)) == [1]
    assert plan.pending[2].reason.startswith("online share of the cluster full (70%): 1/1 GPUs in use")


def test_spread_puts_a_shared_task_on_the_emptiest_server():
    nodes = [node(1, 2), node(2, 2)]
    running = [occupy(nodes, 90, 1, [0], memory=10_000, exclusive=False)]
    plan = schedule(snapshot(nodes, [task(1, memory=10_000, exclusive=False)], running=running, strategy="spread"))
    assert placed(plan)[1][0] == 2


def test_binpack_puts_a_shared_task_beside_existing_shared_work():
    nodes = [node(1, 2), node(2, 2)]
    running = [occupy(nodes, 90, 2, [1], memory=10_000, exclusive=False)]
    plan = schedule(snapshot(nodes, [task(1, memory=10_000, exclusive=False)], running=running))
    assert placed(plan)[1] == (2, (201,))
