"""Gangs across servers in the placement core: all servers at once or none, topology, backfill, preemption."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling.placement import Pass, schedule
from tests.core_factory import NOW, node, occupy, snapshot, task, tenant

CRITICAL, HIGH, NORMAL, LOW = 3, 2, 1, 0


def ranks(plan, task_id):
    p = next(p for p in plan.placements if p.task_id == task_id)
    return [(n, len(gpus)) for n, gpus in p.ranks]


def test_a_16_gpu_gang_takes_two_whole_servers_in_one_placement():
    nodes = [node(1, 8), node(2, 8), node(3, 8)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2)]))
    (p,) = plan.placements
    assert len(p.ranks) == 2 and {n for n, _ in p.ranks} < {1, 2, 3}
    assert p.node_id == p.ranks[0][0]
    assert sorted(p.gpu_ids) == sorted(g for _n, gids in p.ranks for g in gids) and len(set(p.gpu_ids)) == 16
    assert all(len(gids) == 8 for _n, gids in p.ranks)


def test_a_gang_waits_whole_when_only_one_server_is_free_and_says_so():
    nodes = [node(1, 8), node(2, 8)]
    running = [occupy(nodes, 90, 2, [0], ends_in_s=600)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2)], running=running))
    assert plan.placements == []
    assert plan.pending[7].reason.startswith("no 2 servers with 8 free GPUs with 10 GB; best has 1")


def test_all_servers_of_a_gang_share_the_topology_label():
    nodes = [node(1, 8, labels={"rack": "a"}), node(2, 8, labels={"rack": "b"}), node(3, 8, labels={"rack": "b"}),
             node(4, 8)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2, topology_key="rack")]))
    assert sorted(n for n, _ in ranks(plan, 7)) == [2, 3]


def test_the_pending_reason_names_the_topology_and_the_best_group():
    nodes = [node(1, 8, labels={"rack": "a"}), node(2, 8, labels={"rack": "b"}), node(3, 8, labels={"rack": "b"})]
    running = [occupy(nodes, 90, 3, [0], ends_in_s=600)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2, topology_key="rack")], running=running))
    assert plan.pending[7].reason.startswith("no 2 servers with 8 free GPUs with 10 GB sharing rack; best has 1")


def test_a_gang_no_idle_cluster_could_hold_is_refused_with_that_reason():
    nodes = [node(1, 8, labels={"rack": "a"}), node(2, 8, labels={"rack": "b"})]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2, topology_key="rack"), task(8)]))
    assert plan.pending[7].reason == ("no 2 servers with 8 GPUs with 10 GB sharing rack even when idle; "
                                      "the most there are is 1")
    assert [p.task_id for p in plan.placements] == [8]  # it blocks nobody


def test_a_gang_counts_every_gpu_against_its_tenant_quota():
    nodes = [node(1, 8), node(2, 8)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2)], tenants=[tenant(max_gpus=12)]))
    assert plan.pending[7].reason == "tenant acme near its GPU quota (0/12); this task needs 16 more"


def test_a_gang_head_reserves_servers_and_small_tasks_backfill_around_it():
    nodes = [node(1, 8), node(2, 8), node(3, 8)]
    running = [occupy(nodes, 90, 1, [0, 1], ends_in_s=1800), occupy(nodes, 91, 2, [0, 1], ends_in_s=3600),
               occupy(nodes, 92, 3, [0, 1, 2, 3, 4, 5, 6, 7], ends_in_s=7200)]
    pending = [task(7, gpus=16, nodes=2, priority=HIGH),
               task(8, gpus=2, timeout_s=600),  # ends before the reservation: may use the reserved GPUs
               task(9, gpus=2, timeout_s=7200)]  # would delay it: must wait
    run = Pass(snapshot(nodes, pending, running=running))
    plan = run.run()
    res = run.reservation
    assert res.task_id == 7 and res.time == NOW + timedelta(seconds=3600)
    assert sorted(run.n_id[n] for n in res.nodes) == [1, 2]
    assert [p.task_id for p in plan.placements] == [8]
    assert plan.pending[9].reason == "reserved for backfill: would delay task #7"
    assert "GPUs reserved on gpu-01, gpu-02" in plan.pending[7].reason or \
        "GPUs reserved on gpu-02, gpu-01" in plan.pending[7].reason


def test_a_critical_gang_preempts_low_batch_work_on_the_fewest_servers():
    nodes = [node(1, 8), node(2, 8), node(3, 8)]
    running = [occupy(nodes, 90, 1, [0], priority=LOW), occupy(nodes, 91, 2, [0, 1, 2, 3], priority=LOW),
               occupy(nodes, 92, 3, list(range(8)), priority=NORMAL)]
    plan = schedule(snapshot(nodes, [task(7, gpus=16, nodes=2, priority=CRITICAL)], running=running,
                             preemption=("CRITICAL",)))
    assert sorted(p.task_id for p in plan.preemptions) == [90, 91]
    assert sorted(n for n, _ in ranks(plan, 7)) == [1, 2]


def test_a_running_gang_is_replayed_on_every_server_it_holds():
    nodes = [node(1, 8), node(2, 8, labels={"zone": "b"})]
    gang = occupy(nodes, 90, 1, list(range(8)), ends_in_s=600)
    gang.gpu_ids += occupy(nodes, 91, 2, list(range(8)), ends_in_s=600).gpu_ids
    # Only server 2 matches: its GPUs come back when the gang (rank 0 on server 1) ends.
    run = Pass(snapshot(nodes, [task(7, gpus=8, selector={"zone": "b"})], running=[gang]))
    run.run()
    assert run.reservation.time == NOW + timedelta(seconds=600)
    assert [run.n_id[n] for n in run.reservation.nodes] == [2]


# ---------------------------------------------------------------- properties


@st.composite
def gang_clusters(draw):
    racks = "ab"
    nodes = [node(n, draw(st.sampled_from((4, 8))), labels={"rack": draw(st.sampled_from(racks))})
             for n in range(1, draw(st.integers(2, 6)) + 1)]
    running = []
    for nd in nodes:
        if draw(st.booleans()):
            k = draw(st.integers(1, len(nd.gpus)))
            running.append(occupy(nodes, 500 + nd.id, nd.id, list(range(k)), priority=draw(st.integers(0, 2)),
                                  ends_in_s=draw(st.integers(60, 7200))))
    pending = []
    for i in range(1, draw(st.integers(1, 12)) + 1):
        nn = draw(st.sampled_from((1, 1, 2, 2, 3)))
        per = draw(st.sampled_from((1, 2, 4, 8)))
        pending.append(task(i, gpus=nn * per, nodes=nn, priority=draw(st.integers(0, 3)),
                            memory=draw(st.sampled_from((None, 10_000, 70_000))),
                            timeout_s=draw(st.integers(60, 7200)), age_s=draw(st.integers(0, 50)),
                            topology_key=draw(st.sampled_from(("", "rack")))))
    return snapshot(nodes, pending, running=running, tenants=[tenant(max_gpus=draw(st.sampled_from((8, 40, 1000))))],
                    backfill=draw(st.booleans()), strategy=draw(st.sampled_from(("binpack", "spread"))),
                    preemption=draw(st.sampled_from(((), ("CRITICAL", "HIGH")))))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gang_clusters())
def test_a_gang_never_partially_holds_gpus(snap):
    plan = schedule(snap)
    pending = {t.id: t for t in snap.pending}
    labels = {n.id: n.labels for n in snap.nodes}
    gpu_node = {g.id: n.id for n in snap.nodes for g in n.gpus}
    preempted = {p.task_id for p in plan.preemptions}
    held = Counter(g for r in snap.running if r.id not in preempted for g in r.gpu_ids)
    held.update(g for p in plan.placements for g in p.gpu_ids)
    assert all(v == 1 for v in held.values()), "a GPU given twice"
    for p in plan.placements:
        t = pending[p.task_id]
        assert len(p.gpu_ids) == t.gpu_count == len(set(p.gpu_ids))
        if t.nodes == 1:
            assert not p.ranks and {gpu_node[g] for g in p.gpu_ids} == {p.node_id}
            continue
        servers = [n for n, _ in p.ranks]
        assert len(servers) == len(set(servers)) == t.nodes and p.node_id == servers[0]
        for n, gids in p.ranks:
            assert len(gids) == t.gpu_count // t.nodes and {gpu_node[g] for g in gids} == {n}
        if t.topology_key:
            assert len({labels[n].get(t.topology_key) for n in servers}) == 1
    for tid in pending:
        assert (tid in plan.pending) != any(p.task_id == tid for p in plan.placements)


@st.composite
def busy_queues(draw):
    """Four busy 8-GPU servers, a 16-GPU gang at the head and small tasks of mixed lengths behind it."""
    running = []  # (id, [(node, [indexes])], ends_in_s)
    rid = 500
    for n in range(1, 5):
        i = 0
        while i < 8 and draw(st.integers(0, 3)) > 0:
            k = min(draw(st.sampled_from((1, 2, 4))), 8 - i)
            running.append((rid, [(n, list(range(i, i + k)))], draw(st.integers(60, 7200))))
            rid += 1
            i += k
    pending = [task(1, gpus=16, nodes=2, priority=HIGH, timeout_s=3600)]
    pending += [task(i, gpus=draw(st.sampled_from((1, 2, 4, 8))), timeout_s=draw(st.integers(60, 7200)),
                     age_s=-i)
                for i in range(2, draw(st.integers(2, 25)) + 1)]
    return running, pending


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(busy_queues())
def test_a_16_gpu_gang_at_the_head_starts_no_later_than_its_reservation(scenario):
    """Simulated time: every task runs its whole timeout; each pass sees the cluster at that moment."""
    running, queue = scenario
    now = NOW
    promised = None
    pending = {t.id: t for t in queue}
    while 1 in pending:
        nodes = [node(n, 8) for n in range(1, 5)]
        states = []
        for rid, parts, ends_in_s in running:
            first = None
            for n, idx in parts:
                r = occupy(nodes, rid, n, idx, ends_in_s=ends_in_s)
                if first is None:
                    first = r
                else:
                    first.gpu_ids += r.gpu_ids
            first.expected_end = now + timedelta(seconds=ends_in_s)
            states.append(first)
        snap = snapshot(nodes, list(pending.values()), running=states)
        snap.now = now
        run = Pass(snap)
        plan = run.run()
        if promised is None and 1 in plan.pending:
            # Blocked at the head: it must get the reservation at once.
            assert run.reservation is not None and run.reservation.task_id == 1, plan.pending[1].reason
            promised = run.reservation.time
        gpu_at = {g.id: (n.id, g.index) for n in nodes for g in n.gpus}
        for p in plan.placements:
            t = pending.pop(p.task_id)
            parts: dict[int, list[int]] = {}
            for gid in p.gpu_ids:
                n, i = gpu_at[gid]
                parts.setdefault(n, []).append(i)
            running.append((p.task_id, list(parts.items()), t.timeout_s))
        if 1 not in pending:
            break
        assert running, "the gang waits while nothing runs"
        step = min(e for _r, _p, e in running)
        now += timedelta(seconds=step)
        running = [(r, parts, e - step) for r, parts, e in running if e > step]
    if promised is not None:
        assert now <= promised
