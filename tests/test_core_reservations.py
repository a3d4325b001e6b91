"""Booked reservations in the placement core: GPUs kept for one tenant over a window,
with nothing of another tenant on them inside it or still able to hold them at its start."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling.placement import ReservationWindow, schedule
from tests.core_factory import NOW, node, occupy, snapshot, task, tenant
from tests.test_core_properties import clusters

ACME, GLOBEX = 1, 2
TENANTS = [tenant(ACME, "acme"), tenant(GLOBEX, "globex")]


def window(gpu_ids, *, tenant_id=ACME, starts_in_h: float = 0, hours: float = 8, rid: int = 7,
           name: str = "paper-deadline") -> ReservationWindow:
    start = NOW + timedelta(hours=starts_in_h)
    return ReservationWindow(id=rid, name=name, tenant_id=tenant_id, gpu_ids=frozenset(gpu_ids), starts_at=start,
                             ends_at=start + timedelta(hours=hours))


def server_gpus(n) -> list[int]:
    return [g.id for g in n.gpus]


def test_inside_the_window_no_other_tenant_uses_the_reserved_gpus():
    nodes = [node(1, 4), node(2, 4)]
    snap = snapshot(nodes, [task(1, tenant_id=GLOBEX, gpus=4), task(2, tenant_id=GLOBEX, gpus=4)],
                    tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=-1)]
    plan = schedule(snap)
    assert [(p.task_id, p.node_id) for p in plan.placements] == [(1, 2)]
    assert plan.pending[2].reason.startswith("free GPUs are booked by reservation paper-deadline until ")


def test_the_owner_uses_its_reserved_gpus_and_a_named_task_only_those():
    nodes = [node(1, 4), node(2, 4)]
    snap = snapshot(nodes, [dataclasses.replace(task(1, gpus=2), reservation_id=7), task(2, gpus=4)],
                    tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[1]), starts_in_h=-1)]
    plan = schedule(snap)
    placed = {p.task_id: p.node_id for p in plan.placements}
    assert placed == {1: 2, 2: 1}


def test_before_the_window_only_work_that_ends_by_its_start_uses_the_gpus():
    nodes = [node(1, 4)]
    short = task(1, tenant_id=GLOBEX, gpus=2, timeout_s=3600)  # ends exactly at the start: allowed
    long = task(2, tenant_id=GLOBEX, gpus=2, timeout_s=3601)
    snap = snapshot(nodes, [short, long], tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=1)]
    plan = schedule(snap)
    assert [p.task_id for p in plan.placements] == [1]
    assert plan.pending[2].reason == (
        "free GPUs are booked by reservation paper-deadline from 2026-01-01 13:00 UTC; "
        "this task's timeout would run past that")


def test_a_task_naming_a_future_reservation_waits_for_it_and_starts_at_its_start():
    nodes = [node(1, 4)]
    named = dataclasses.replace(task(1, gpus=4), reservation_id=7)
    snap = snapshot(nodes, [named], tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=2)]
    assert schedule(snap).pending[1].reason == "waiting for reservation paper-deadline, starts in 2 h"
    at_start = dataclasses.replace(snap, now=snap.reservations[0].starts_at)
    assert [p.task_id for p in schedule(at_start).placements] == [1]


def test_a_task_naming_an_unknown_or_foreign_reservation_says_so():
    nodes = [node(1, 4)]
    snap = snapshot(nodes, [dataclasses.replace(task(1), reservation_id=99),
                            dataclasses.replace(task(2, tenant_id=GLOBEX), reservation_id=7)], tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=-1)]
    plan = schedule(snap)
    assert plan.pending[1].reason == "reservation #99 is not active (over, released or not approved)"
    assert plan.pending[2].reason == "reservation paper-deadline belongs to another tenant"


def test_a_window_that_is_over_books_nothing():
    nodes = [node(1, 4)]
    snap = snapshot(nodes, [task(1, tenant_id=GLOBEX, gpus=4)], tenants=TENANTS)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=-9, hours=9)]
    assert [p.task_id for p in schedule(snap).placements] == [1]


def test_the_backfill_head_is_not_reserved_onto_gpus_booked_for_another_tenant():
    nodes = [node(1, 4), node(2, 4)]
    running = [occupy(nodes, 900, 1, [0, 1, 2, 3], tenant_id=GLOBEX, ends_in_s=600),
               occupy(nodes, 901, 2, [0, 1, 2, 3], tenant_id=GLOBEX, ends_in_s=7200)]
    head = task(1, tenant_id=GLOBEX, gpus=4, priority=3, timeout_s=60)
    snap = snapshot(nodes, [head], tenants=TENANTS, running=running, backfill=True)
    snap.reservations = [window(server_gpus(nodes[0]), starts_in_h=-1, hours=48)]
    plan = schedule(snap)
    assert "GPUs reserved on gpu-02" in plan.pending[1].reason


# --- properties ---------------------------------------------------------------------------

@st.composite
def booked_clusters(draw):
    snap = draw(clusters())
    gpus = [g.id for n in snap.nodes for g in n.gpus]
    windows = []
    taken: set[int] = set()
    for rid in range(1, draw(st.integers(1, 3)) + 1):
        free = [g for g in gpus if g not in taken]
        if not free:
            break
        chosen = draw(st.lists(st.sampled_from(free), min_size=1, max_size=min(8, len(free)), unique=True))
        taken.update(chosen)
        start = NOW + timedelta(seconds=draw(st.integers(-7200, 7200)))
        windows.append(ReservationWindow(id=rid, name=f"r{rid}", tenant_id=draw(st.integers(1, 3)),
                                         gpu_ids=frozenset(chosen), starts_at=start,
                                         ends_at=start + timedelta(seconds=draw(st.integers(60, 20000)))))
    pending = [dataclasses.replace(t, reservation_id=draw(st.sampled_from((None, None, None, 1, 2))))
               for t in snap.pending]
    return dataclasses.replace(snap, pending=pending, reservations=windows)


common = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(booked_clusters())
def test_property_no_other_tenant_can_hold_reserved_gpus_inside_a_window(snap):
    plan = schedule(snap)
    tasks = {t.id: t for t in snap.pending}
    for p in plan.placements:
        t = tasks[p.task_id]
        end = snap.now + timedelta(seconds=t.timeout_s)
        for w in snap.reservations:
            if w.tenant_id == t.tenant_id or w.ends_at <= snap.now:
                continue
            # Inside the window, or could still hold the GPUs when it opens: never on its GPUs.
            if w.starts_at <= snap.now or end > w.starts_at:
                assert not (set(p.gpu_ids) & w.gpu_ids), (t, w)


@common
@given(booked_clusters())
def test_property_a_task_naming_a_reservation_runs_only_on_it_inside_its_window(snap):
    plan = schedule(snap)
    tasks = {t.id: t for t in snap.pending}
    windows = {w.id: w for w in snap.reservations}
    for p in plan.placements:
        t = tasks[p.task_id]
        if t.reservation_id is None:
            continue
        w = windows[t.reservation_id]
        assert w.tenant_id == t.tenant_id and w.starts_at <= snap.now < w.ends_at
        assert set(p.gpu_ids) <= w.gpu_ids
