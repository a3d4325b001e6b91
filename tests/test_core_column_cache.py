"""The placement core's per-server column cache (``Snapshot.columns``): a working state built
with columns kept from an earlier pass is the one built from scratch, whatever changed."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduling.placement import ColumnCache, schedule
from scheduling.placement.state import WorkingState
from tests.core_factory import NOW, gpu, node, occupy, snapshot, task

_SKIP = {"gpus"}  # the fit rule's object: its columns are compared below


def state_of(state: WorkingState) -> dict:
    return {k: v for k, v in vars(state).items() if not k.startswith("_") and k not in _SKIP}


def assert_same_as_fresh(snap) -> None:
    fresh = WorkingState(dataclasses.replace(snap, columns=None))
    assert state_of(WorkingState(snap)) == state_of(fresh)


def test_reused_columns_equal_fresh_ones_through_changes():
    cache = ColumnCache()
    nodes = [node(1, idle_s=7200), node(2, idle_s=None), node(3, idle_s=7200, loaded=("llama",)),
             node(4, idle_s=7200, schedulable=False)]
    running = [occupy(nodes, 9, 2, [0, 1], memory=30_000), occupy(nodes, 10, 3, [2], memory=8_000, exclusive=False)]
    snap = dataclasses.replace(snapshot(nodes, [task(gpus=2, memory=20_000)], running=running), columns=cache)
    assert_same_as_fresh(snap)
    assert set(cache.nodes) == {1, 2, 3, 4}  # every server's GPUs idle for over an hour, or busy
    kept = dict(cache.nodes)

    # Unchanged objects: the same columns serve the next pass.
    assert_same_as_fresh(snap)
    assert all(cache.nodes[n] is kept[n] for n in kept)

    # A changed GPU is a new object (as scheduling.passes builds it): its server is rebuilt, alone.
    nodes[0].gpus[3] = gpu(1, 3, claimed=40_000, live=40_000, exclusive_taken=True, idle_s=None)
    nodes[1] = dataclasses.replace(nodes[1], schedulable=False)
    assert_same_as_fresh(snap)
    assert cache.nodes[1] is not kept[1] and cache.nodes[2] is not kept[2]
    assert cache.nodes[3] is kept[3] and cache.nodes[4] is kept[4]

    # A GPU swapped for another (a new id at the same place), a server with fewer GPUs, a
    # server gone: the cluster's columns are patched or laid out again, and still the same.
    nodes[2].gpus[5] = gpu(7, 5, idle_s=7200)
    assert_same_as_fresh(snap)
    nodes[3] = node(4, gpus=4, idle_s=7200)
    assert_same_as_fresh(snap)
    del nodes[0]
    assert_same_as_fresh(snap)
    assert_same_as_fresh(snap)

    # The plan is the one a pass without the cache makes.
    assert schedule(snap) == schedule(dataclasses.replace(snap, columns=None))


def test_columns_are_kept_while_no_idle_step_passes():
    cache = ColumnCache()
    nodes = [node(1, idle_s=630), node(2, idle_s=7200)]
    snap = dataclasses.replace(snapshot(nodes, [task()]), columns=cache)
    assert_same_as_fresh(snap)
    # Server 1's GPUs have been idle 10 min 30 s: their idle score holds until 11 min.
    assert set(cache.nodes) == {1, 2}
    kept = dict(cache.nodes)

    within = dataclasses.replace(snap, now=NOW + timedelta(seconds=29))
    assert_same_as_fresh(within)
    assert cache.nodes[1] is kept[1] and cache.nodes[2] is kept[2]

    # A minute boundary passed: server 1 is rebuilt; server 2, idle past the saturation, is not.
    after = dataclasses.replace(snap, now=NOW + timedelta(seconds=30))
    assert_same_as_fresh(after)
    assert cache.nodes[1] is not kept[1] and cache.nodes[2] is kept[2]

    # An earlier clock (what-if, tests) than the one the columns hold from is never served them.
    kept = dict(cache.nodes)
    earlier = dataclasses.replace(snap, now=NOW - timedelta(hours=1, minutes=30))
    assert_same_as_fresh(earlier)
    assert cache.nodes[1] is not kept[1] and cache.nodes[2] is not kept[2]

    # Nor a different strategy.
    assert_same_as_fresh(snap)
    kept = cache.nodes[2]
    spread = dataclasses.replace(snap, config=dataclasses.replace(snap.config, strategy="spread"))
    assert_same_as_fresh(spread)
    assert cache.nodes[2] is not kept


@settings(max_examples=60, deadline=None)
@given(idle=st.lists(st.one_of(st.none(), st.floats(-120, 4000)), min_size=1, max_size=8),
       clocks=st.lists(st.floats(-4000, 4000), min_size=1, max_size=6))
def test_kept_columns_equal_fresh_ones_at_any_clock(idle, clocks):
    """Whatever the GPUs' idle times and however the clock moves (backwards too), a pass
    served kept columns sees exactly the state it would have built."""
    cache = ColumnCache()
    nodes = [node(1, gpus=len(idle)), node(2, idle_s=7200)]
    for i, seconds in enumerate(idle):
        nodes[0].gpus[i] = gpu(1, i, idle_s=seconds)
    base = dataclasses.replace(snapshot(nodes, [task()]), columns=cache)
    for offset in clocks:
        assert_same_as_fresh(dataclasses.replace(base, now=NOW + timedelta(seconds=offset)))
