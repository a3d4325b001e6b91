"""Hypothesis properties of the placement core: whatever the cluster and the queue, the plan is safe."""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling.placement import NodeState, Pass, queue_order, schedule
from tests.core_factory import gpu, occupy, snapshot, task, tenant

MODELS = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L4")
TOTALS = {MODELS[0]: 80_000, MODELS[1]: 40_000, MODELS[2]: 24_000}
MEMORIES = (None, 0, 4_000, 4_000, 10_000, 10_000, 20_000, 38_000, 60_000)


@st.composite
def scenarios(draw):
    nodes = []
    for n in range(1, draw(st.integers(1, 4)) + 1):
        model = draw(st.sampled_from(MODELS))
        count = draw(st.sampled_from((1, 2, 4, 8, 8)))
        labels = {"zone": draw(st.sampled_from("ab"))}
        gpus = [gpu(n, i, total=TOTALS[model], model=model, util=draw(st.integers(0, 100)),
                    temp=draw(st.integers(20, 90)), live=draw(st.sampled_from((0, 0, 500, 30_000))),
                    loaded=tuple(draw(st.lists(st.sampled_from(("m1", "m2", "m3")), max_size=2, unique=True))),
                    schedulable=draw(st.integers(0, 9)) > 0)
                for i in range(count)]
        nodes.append(NodeState(id=n, name=f"gpu-{n}", labels=labels, schedulable=draw(st.integers(0, 5)) > 0,
                               gpus=gpus))
    tenants = [tenant(t, f"t{t}", max_gpus=draw(st.sampled_from((0, 4, 12, 100))),
                      max_mem=draw(st.sampled_from((50_000, 400_000, 10**7))),
                      max_tasks=draw(st.sampled_from((1, 6, 100)))) for t in (1, 2, 3)]
    running = []
    rid = 500
    for nd in nodes:
        free = list(range(len(nd.gpus)))
        while free and draw(st.booleans()):
            k = draw(st.integers(1, len(free)))
            idx, free = free[:k], free[k:]
            exclusive = draw(st.booleans())
            mem = draw(st.sampled_from((4_000, 10_000))) if not exclusive else TOTALS[nd.gpus[0].model_name] // 2
            tid = draw(st.integers(1, 3))
            r = occupy(nodes, rid, nd.id, idx, tenant_id=tid, priority=draw(st.integers(0, 3)),
                       cls=draw(st.sampled_from(("online", "batch"))), memory=mem, exclusive=exclusive,
                       ends_in_s=draw(st.integers(-100, 7200)))
            running.append(r)
            t = next(x for x in tenants if x.id == tid)
            t.used_gpus += k
            t.used_gpu_memory_mb += k * mem
            t.running_tasks += 1
            rid += 1
    pending = [
        task(i, tenant_id=draw(st.integers(1, 3)), priority=draw(st.integers(0, 3)),
             gpus=draw(st.sampled_from((1, 1, 1, 2, 2, 4, 8))),
             memory=draw(st.sampled_from(MEMORIES)), exclusive=draw(st.booleans()),
             cls=draw(st.sampled_from(("online", "batch"))), timeout_s=draw(st.integers(60, 9000)),
             age_s=draw(st.integers(0, 50)), model=draw(st.sampled_from(("", "m1", "m4"))),
             selector=draw(st.sampled_from(({}, {}, {}, {"zone": "a"}))),
             gpu_model=draw(st.sampled_from(("", "", "", "", "h100", "A100"))))
        for i in range(1, draw(st.integers(0, 30)) + 1)
    ]
    shares = draw(st.sampled_from(((1.0, 1.0), (0.7, 0.3), (0.5, 0.5))))
    config = {
        "online_share": shares[0], "batch_share": shares[1],
        "allow_borrowing": draw(st.booleans()),
        "strategy": draw(st.sampled_from(("binpack", "spread"))),
        "backfill": draw(st.booleans()),
        "preemption": draw(st.sampled_from(((), ("CRITICAL",), ("HIGH", "CRITICAL")))),
        "memory_safety_margin_mb": draw(st.sampled_from((0, 2000))),
    }
    return snapshot(nodes, pending, tenants=tenants, running=running, **config)


@st.composite
def backfill_scenarios(draw):
    """Busy servers, a big task at the head and small tasks of mixed lengths behind it."""
    nodes = [NodeState(id=n, name=f"gpu-{n}", labels={}, schedulable=True, gpus=[gpu(n, i) for i in range(8)])
             for n in range(1, draw(st.integers(1, 3)) + 1)]
    running = []
    rid = 500
    for nd in nodes:
        i = 0
        while i < 8 and draw(st.integers(0, 4)) > 0:
            k = min(draw(st.sampled_from((1, 2, 4))), 8 - i)
            running.append(occupy(nodes, rid, nd.id, list(range(i, i + k)), memory=20_000,
                                  ends_in_s=draw(st.integers(60, 7200))))
            rid += 1
            i += k
    pending = [task(1, priority=3, gpus=draw(st.sampled_from((4, 8))), memory=draw(st.sampled_from((None, 20_000))))]
    pending += [task(i, priority=draw(st.integers(0, 2)), gpus=draw(st.sampled_from((1, 1, 2, 4))),
                     memory=draw(st.sampled_from((None, 10_000, 20_000))), exclusive=draw(st.booleans()),
                     timeout_s=draw(st.integers(60, 7200)), age_s=draw(st.integers(0, 50)))
                for i in range(2, draw(st.integers(2, 20)) + 1)]
    return snapshot(nodes, pending, running=running, strategy=draw(st.sampled_from(("binpack", "spread"))))


@st.composite
def preemption_scenarios(draw):
    """A cluster full of running work, some of it LOW batch or borrowed, and urgent tasks waiting."""
    nodes = [NodeState(id=n, name=f"gpu-{n}", labels={}, schedulable=True, gpus=[gpu(n, i) for i in range(4)])
             for n in range(1, draw(st.integers(1, 3)) + 1)]
    running = []
    rid = 500
    for nd in nodes:
        i = 0
        while i < 4:
            k = min(draw(st.sampled_from((1, 1, 2, 4))), 4 - i)
            exclusive = draw(st.booleans())
            running.append(occupy(nodes, rid, nd.id, list(range(i, i + k)), priority=draw(st.integers(0, 3)),
                                  cls=draw(st.sampled_from(("online", "batch", "batch"))), exclusive=exclusive,
                                  memory=draw(st.sampled_from((10_000, 30_000))) if not exclusive else 40_000,
                                  ends_in_s=draw(st.integers(60, 7200))))
            rid += 1
            i += k
    pending = [task(i, priority=draw(st.integers(1, 3)), gpus=draw(st.sampled_from((1, 2, 4))),
                    memory=draw(st.sampled_from((None, 10_000, 30_000))), exclusive=draw(st.booleans()),
                    cls=draw(st.sampled_from(("online", "batch"))), timeout_s=draw(st.integers(60, 7200)),
                    age_s=draw(st.integers(0, 50)))
               for i in range(1, draw(st.integers(1, 10)) + 1)]
    shares = draw(st.sampled_from(((1.0, 1.0), (0.5, 0.5), (0.7, 0.3))))
    return snapshot(nodes, pending, running=running, online_share=shares[0], batch_share=shares[1],
                    allow_borrowing=draw(st.booleans()), backfill=draw(st.booleans()),
                    preemption=draw(st.sampled_from((("CRITICAL",), ("HIGH", "CRITICAL")))))


def clusters():
    return st.one_of(scenarios(), backfill_scenarios(), preemption_scenarios())


def final_state(snap, plan):
    """Per GPU id: [claimed, live, exclusive count, shared count] after victims leave and placements land."""
    state = {g.id: [g.memory_claimed_mb, g.memory_used_live_mb, int(g.exclusive_taken), g.shared_count]
             for n in snap.nodes for g in n.gpus}
    running = {r.id: r for r in snap.running}
    for p in plan.preemptions:
        r = running[p.task_id]
        for gid in r.gpu_ids:
            s = state[gid]
            s[0] -= r.memory_mb
            s[1] = max(0, s[1] - r.memory_mb)
            if r.exclusive:
                s[2] -= 1
            else:
                s[3] -= 1
    before = {gid: list(s) for gid, s in state.items()}
    for p in plan.placements:
        for gid in p.gpu_ids:
            s = state[gid]
            s[0] += p.memory_mb
            if p.exclusive:
                s[2] += 1
            else:
                s[3] += 1
    return before, state


def fits_on(snap, t, state, margin) -> bool:
    """Independent fit check: could ``t`` get all its GPUs on one active server in ``state``?"""
    for n in snap.nodes:
        if not n.schedulable or any(n.labels.get(k) != v for k, v in t.node_selector.items()):
            continue
        ok = 0
        for g in n.gpus:
            if not g.schedulable or (t.gpu_model and t.gpu_model.lower() not in g.model_name.lower()):
                continue
            claimed, live, excl, shared = state[g.id]
            if excl:
                continue
            if t.memory_mb is not None and not t.exclusive:
                ok += max(claimed, live) + t.memory_mb + margin <= g.memory_total_mb
            else:
                ok += (not shared and claimed == 0
                       and live + (t.memory_mb or 0) + margin <= g.memory_total_mb)
        if ok >= t.gpu_count:
            return True
    return False


common = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(clusters())
def test_no_gpu_is_ever_over_committed_in_memory_or_exclusivity(snap):
    plan = schedule(snap)
    margin = snap.config.memory_safety_margin_mb
    before, after = final_state(snap, plan)
    totals = {g.id: g.memory_total_mb for n in snap.nodes for g in n.gpus}
    new_on = Counter(gid for p in plan.placements for gid in p.gpu_ids)
    for p in plan.placements:
        for gid in p.gpu_ids:
            claimed, live, excl, shared = before[gid]
            if p.exclusive:
                # An exclusive allocation only ever lands on a GPU nobody holds, and nobody joins it.
                assert (claimed, excl, shared) == (0, 0, 0) and new_on[gid] == 1
                assert p.memory_mb == totals[gid] or live + p.memory_mb + margin <= totals[gid]
            else:
                assert excl == 0 and after[gid][2] == 0
                assert after[gid][0] + margin <= totals[gid]
                assert live + p.memory_mb + margin <= totals[gid]


@common
@given(clusters())
def test_no_tenant_quota_or_class_share_is_exceeded_by_the_plan(snap):
    plan = schedule(snap)
    pending = {t.id: t for t in snap.pending}
    running = {r.id: r for r in snap.running}
    usage = {tid: [t.used_gpus, t.used_gpu_memory_mb, t.running_tasks] for tid, t in snap.tenants.items()}
    for pr in plan.preemptions:
        r = running[pr.task_id]
        u = usage[r.tenant_id]
        u[0] -= len(r.gpu_ids)
        u[1] -= len(r.gpu_ids) * r.memory_mb
        u[2] -= 1
    placed_by = Counter()
    for p in plan.placements:
        tid = pending[p.task_id].tenant_id
        placed_by[tid] += 1
        u = usage[tid]
        u[0] += len(p.gpu_ids)
        u[1] += len(p.gpu_ids) * p.memory_mb
        u[2] += 1
    for tid in placed_by:
        t = snap.tenants[tid]
        assert usage[tid][0] <= t.max_gpus
        assert usage[tid][1] <= t.max_gpu_memory_mb
        assert usage[tid][2] <= t.max_running_tasks
    if not snap.config.allow_borrowing and snap.config.online_share < 1:
        total = sum(1 for n in snap.nodes if n.schedulable for g in n.gpus if g.schedulable)
        for cls, share in (("online", snap.config.online_share), ("batch", snap.config.batch_share)):
            new = sum(len(p.gpu_ids) for p in plan.placements if pending[p.task_id].workload_class == cls)
            held = sum(len(r.gpu_ids) for r in snap.running if r.workload_class == cls) - sum(
                len(running[pr.task_id].gpu_ids) for pr in plan.preemptions
                if running[pr.task_id].workload_class == cls)
            if new:
                assert held + new <= int(share * total + 0.5)


@common
@given(clusters())
def test_a_gang_gets_all_its_gpus_on_one_matching_server_or_nothing(snap):
    plan = schedule(snap)
    pending = {t.id: t for t in snap.pending}
    gpus = {g.id: (n, g) for n in snap.nodes for g in n.gpus}
    for p in plan.placements:
        t = pending[p.task_id]
        assert len(p.gpu_ids) == len(set(p.gpu_ids)) == t.gpu_count
        for gid in p.gpu_ids:
            n, g = gpus[gid]
            assert n.id == p.node_id and n.schedulable and g.schedulable
            assert all(n.labels.get(k) == v for k, v in t.node_selector.items())
            assert t.gpu_model.lower() in g.model_name.lower()
        if t.memory_mb is not None:
            assert p.memory_mb == t.memory_mb


@common
@given(clusters())
def test_a_higher_priority_task_that_fits_is_never_left_behind_a_lower_priority_one(snap):
    plan = schedule(snap)
    if plan.preemptions:
        return  # preemption moves capacity around mid-pass; its own tests cover it
    margin = snap.config.memory_safety_margin_mb
    order = queue_order(snap.pending)
    rank = {t.id: i for i, t in enumerate(order)}
    _, after = final_state(snap, plan)
    for h in order:
        info = plan.pending.get(h.id)
        if info is None or not info.reason.startswith("no server has"):
            continue  # placed, or waiting for its own quota/share/constraints
        for p in plan.placements:
            if rank[p.task_id] < rank[h.id]:
                continue
            state = {gid: list(s) for gid, s in after.items()}
            for gid in p.gpu_ids:
                s = state[gid]
                s[0] -= p.memory_mb
                s[2 if p.exclusive else 3] -= 1
            assert not fits_on(snap, h, state, margin), (h, p)


@common
@given(clusters())
def test_every_task_is_placed_or_pending_with_a_reason_and_a_unique_position(snap):
    plan = schedule(snap)
    placed = {p.task_id for p in plan.placements}
    assert len(placed) == len(plan.placements)
    assert placed.isdisjoint(plan.pending)
    assert placed | set(plan.pending) == {t.id for t in snap.pending}
    assert all(info.reason for info in plan.pending.values())
    assert sorted(info.position for info in plan.pending.values()) == list(range(1, len(plan.pending) + 1))
    order = [t.id for t in queue_order(snap.pending) if t.id in plan.pending]
    assert [plan.pending[i].position for i in order] == list(range(1, len(order) + 1))
    victims = [p.task_id for p in plan.preemptions]
    assert len(victims) == len(set(victims)) and set(victims) <= {r.id for r in snap.running}
    running = {r.id: r for r in snap.running}
    for p in plan.preemptions:
        if p.reason.startswith("preempted"):
            assert running[p.task_id].priority == 0 and running[p.task_id].workload_class == "batch"



@common
@given(clusters())
def test_a_task_said_to_wait_for_capacity_really_fits_nowhere(snap):
    plan = schedule(snap)
    if plan.preemptions:
        return  # capacity freed by a preemption goes to the preemptor; covered by its own tests
    _, after = final_state(snap, plan)
    for t in snap.pending:
        info = plan.pending.get(t.id)
        if info is not None and info.reason.startswith("no server ha"):
            assert not fits_on(snap, t, after, snap.config.memory_safety_margin_mb), info.reason


@common
@given(clusters())
def test_no_backfilled_task_delays_the_reserved_start_of_the_blocked_head(snap):
    from datetime import timedelta

    run = Pass(snap)
    plan = run.run()
    res = run.reservation
    if res is None or plan.preemptions:
        return
    head = next(t for t in snap.pending if t.id == res.task_id)
    # The cluster at the reserved time T: running tasks that end by T are gone, placements that
    # outlive T are still there. The head must still fit on the GPUs it was promised.
    state = {g.id: [g.memory_claimed_mb, g.memory_used_live_mb, int(g.exclusive_taken), g.shared_count]
             for n in snap.nodes for g in n.gpus}
    for r in snap.running:
        if r.expected_end <= res.time:
            for gid in r.gpu_ids:
                s = state[gid]
                s[0] -= r.memory_mb
                s[1] = max(0, s[1] - r.memory_mb)
                s[2 if r.exclusive else 3] -= 1
    pending = {t.id: t for t in snap.pending}
    for p in plan.placements:
        if snap.now + timedelta(seconds=pending[p.task_id].timeout_s) > res.time:
            for gid in p.gpu_ids:
                s = state[gid]
                s[0] += p.memory_mb
                s[2 if p.exclusive else 3] += 1
    promised = {run.g_id[g] for g in res.gpus}
    node = next(n for n in snap.nodes if n.id == run.n_id[res.nodes[0]])
    only_promised = dataclasses.replace(node, gpus=[g for g in node.gpus if g.id in promised])
    reduced = dataclasses.replace(snap, nodes=[only_promised])
    assert fits_on(reduced, head, state, snap.config.memory_safety_margin_mb)


@common
@given(clusters())
def test_every_preemption_makes_room_for_a_task_placed_on_the_victims_server(snap):
    plan = schedule(snap)
    placements = {p.task_id: p for p in plan.placements}
    running = {r.id: r for r in snap.running}
    pending = {t.id: t for t in snap.pending}
    for pr in plan.preemptions:
        victim = running[pr.task_id]
        by = pending[pr.by_task_id]
        assert pr.by_task_id in placements, "a task preempted for must be placed in the same plan"
        assert placements[pr.by_task_id].node_id == victim.node_id
        assert victim.priority <= by.priority
        if pr.reason.startswith("preempted"):
            assert by.priority > 0 and victim.priority == 0 and victim.workload_class == "batch"
        else:
            assert pr.reason.startswith("borrowed") and victim.workload_class != by.workload_class


# ---------------------------------------------------------------- quota holds (wide tasks)


def _quota_start(now, used, ends, need, limits):
    """Earliest time ``need`` fits in ``limits`` as the (end, gpus, memory) ``ends`` free usage."""
    used = list(used)
    if all(u + n <= lim for u, n, lim in zip(used, need, limits, strict=True)):
        return now
    for when, gpus, memory in sorted(ends, key=lambda e: e[0]):
        used[0] -= gpus
        used[1] -= memory
        used[2] -= 1
        if all(u + n <= lim for u, n, lim in zip(used, need, limits, strict=True)):
            return when
    return None


def _tenant_quota_start(snap, tenant_state, running, placed, tasks, need, limits):
    """When ``need`` fits the tenant's quota if ``tasks`` (placed in the plan) run too."""
    from datetime import timedelta

    ends = running + [(snap.now + timedelta(seconds=t.timeout_s), t.gpu_count, placed[t.id].memory_mb * t.gpu_count)
                      for t in tasks]
    used = (tenant_state.used_gpus + sum(t.gpu_count for t in tasks),
            tenant_state.used_gpu_memory_mb + sum(placed[t.id].memory_mb * t.gpu_count for t in tasks),
            tenant_state.running_tasks + len(tasks))
    return _quota_start(snap.now, used, ends, need, limits)


@st.composite
def quota_scenarios(draw):
    """Room to spare on the servers; tenants near their GPU quota, with running tasks ending at
    different times and a queue of wide and narrow tasks of mixed lengths."""
    nodes = [NodeState(id=n, name=f"gpu-{n}", labels={}, schedulable=True,
                       gpus=[gpu(n, i, total=80_000) for i in range(8)]) for n in (1, 2, 3, 4)]
    tenants = [tenant(t, f"t{t}", max_gpus=draw(st.sampled_from((4, 8, 12))), max_mem=10**7,
                      max_tasks=draw(st.sampled_from((3, 100)))) for t in (1, 2)]
    running = []
    rid = 500
    for nd in nodes[:2]:
        free = list(range(8))
        while free and draw(st.booleans()):
            k = draw(st.integers(1, min(4, len(free))))
            idx, free = free[:k], free[k:]
            t = tenants[draw(st.integers(0, 1))]
            running.append(occupy(nodes, rid, nd.id, idx, tenant_id=t.id, memory=10_000,
                                  ends_in_s=draw(st.integers(60, 7200))))
            t.used_gpus += k
            t.used_gpu_memory_mb += k * 10_000
            t.running_tasks += 1
            rid += 1
    pending = [task(i, tenant_id=draw(st.integers(1, 2)), priority=draw(st.sampled_from((1, 1, 1, 2))),
                    gpus=draw(st.sampled_from((1, 1, 2, 4, 8))), memory=10_000,
                    timeout_s=draw(st.integers(60, 9000)), age_s=draw(st.integers(0, 50)))
               for i in range(1, draw(st.integers(1, 14)) + 1)]
    return snapshot(nodes, pending, tenants=tenants, running=running, backfill=draw(st.booleans()))


@common
@given(st.one_of(scenarios(), quota_scenarios()))
def test_a_tenants_later_tasks_never_delay_the_quota_start_of_its_first_quota_blocked_task(snap):
    snap = dataclasses.replace(snap, config=dataclasses.replace(snap.config, preemption=(), allow_borrowing=False))
    plan = schedule(snap)
    order = queue_order(snap.pending)
    placed = {p.task_id: p for p in plan.placements}
    for tenant_state in snap.tenants.values():
        mine = [t for t in order if t.tenant_id == tenant_state.id]
        quota_words = (f"tenant {tenant_state.slug} at its", f"tenant {tenant_state.slug} near its")
        blocked = [t for t in mine if t.id in plan.pending and plan.pending[t.id].reason.startswith(quota_words)]
        if not blocked or blocked[0].memory_mb is None:
            continue
        head = blocked[0]
        limits = (tenant_state.max_gpus, tenant_state.max_gpu_memory_mb, tenant_state.max_running_tasks)
        need = (head.gpu_count, head.gpu_count * head.memory_mb, 1)
        if any(n > lim for n, lim in zip(need, limits, strict=True)):
            continue
        running = [(r.expected_end, len(r.gpu_ids), r.memory_mb * len(r.gpu_ids))
                   for r in snap.running if r.tenant_id == tenant_state.id]

        ahead = [t for t in mine[:mine.index(head)] if t.id in placed]
        behind = [t for t in mine[mine.index(head) + 1:] if t.id in placed]
        at_its_turn = _tenant_quota_start(snap, tenant_state, running, placed, ahead, need, limits)
        if at_its_turn is None:
            continue
        after = _tenant_quota_start(snap, tenant_state, running, placed, ahead + behind, need, limits)
        assert after is not None and after <= at_its_turn, (head.id, [t.id for t in behind])


# ---------------------------------------------------------------- fair share


@st.composite
def fair_share_scenarios(draw):
    snap = draw(st.one_of(scenarios(), quota_scenarios()))
    for t in snap.tenants.values():
        t.fair_share = draw(st.sampled_from((0.05, 0.3, 0.49, 0.51, 0.8, 1.0)))
    return dataclasses.replace(snap, config=dataclasses.replace(snap.config, fair_share=True))


@common
@given(fair_share_scenarios())
def test_with_fair_share_no_tenant_below_its_share_waits_behind_one_above_it(snap):
    """Below its share: factor > 1/2 (usage < share). Whatever tasks of tenants above their share
    (factor < 1/2) wait at the same or a lower priority, a below-share task's outcome is the
    same as if they were not there: they never take what it would have got."""
    plan = schedule(snap)
    placed = {p.task_id: (p.node_id, p.gpu_ids) for p in plan.placements}
    above = {tid for tid, t in snap.tenants.items() if t.fair_share < 0.5}
    for level in sorted({t.priority for t in snap.pending}):
        without = [t for t in snap.pending if not (t.tenant_id in above and t.priority <= level)]
        if len(without) == len(snap.pending):
            continue
        alone = {p.task_id: (p.node_id, p.gpu_ids) for p in schedule(dataclasses.replace(snap, pending=without))
                 .placements}
        for t in snap.pending:
            if t.priority == level and t.tenant_id not in above and snap.tenants.get(t.tenant_id) is not None:
                assert placed.get(t.id) == alone.get(t.id), t.id


@common
@given(fair_share_scenarios())
def test_fair_share_keeps_the_backfill_and_priority_guarantees(snap):
    test_no_backfilled_task_delays_the_reserved_start_of_the_blocked_head.hypothesis.inner_test(snap)
    test_no_tenant_quota_or_class_share_is_exceeded_by_the_plan.hypothesis.inner_test(snap)
