"""Backfill (EASY): the blocked head task's reservation, computed by replaying ends.

The first task in queue order that is blocked by capacity (not by its quota, class share or
constraints) and that could start once running tasks end gets a *reservation*: the earliest
time T at which, replaying the running tasks' ``expected_end`` (and the ends, ``now +
timeout_s``, of tasks placed earlier in this pass), it fits (on one server, or a gang on its
servers), and the GPUs it would take there. A later task may start now only if it cannot
delay that reservation: it ends by T or it uses none of the reserved GPUs (``admission``
adds them to the GPUs such a task must keep off). Only that one reservation is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from scheduling.placement.gangs import topology_group
from scheduling.placement.state import WorkingState
from scheduling.placement.types import PendingTask


class Reservation:
    """The head task's promise: its GPUs on ``nodes`` (one server, or a gang's) free by ``time``."""

    __slots__ = ("gpus", "nodes", "task_id", "time")

    def __init__(self, task_id: int, when: datetime, nodes: tuple[int, ...], gpus: frozenset[int]) -> None:
        self.task_id = task_id
        self.time = when
        self.nodes = nodes  # one server, or a gang's servers
        self.gpus = gpus


class Backfill(WorkingState):
    """The reservation of the blocked head (mixed into ``planner.Pass``)."""

    elig_cache: dict[tuple, dict[int, tuple[int, ...]]]

    def _reserve(self, task: PendingTask, shape: tuple, booked: frozenset[int] | None = None) -> Reservation | None:
        """Earliest time and GPUs at which ``task`` fits on one server, replaying the ends of running tasks."""
        c, mem, mode, ckey = shape
        elig = self.elig_cache[ckey]
        events: dict[int, list[tuple]] = {}
        for n, when, change in self._end_events(elig):
            events.setdefault(n, []).append((when, change))
        best: Reservation | None = None
        for n, evs in events.items():
            evs.sort(key=lambda e: e[0])
            gl = elig[n]
            if len(gl) < c:
                continue
            state = self.sim_node(gl)
            for when, change in evs:
                if best is not None and when >= best.time:
                    break
                self.sim_release(state, change)
                q = state.qualifying(gl, mem, mode, booked)
                if len(q) >= c:
                    best = Reservation(task.id, when, (n,), frozenset(q[:c]))
                    break
        return best

    def _reserve_gang(self, task: PendingTask, shape: tuple) -> Reservation | None:
        """Earliest time at which ``nodes`` servers of one group can each hold a rank, replaying
        the ends of running tasks across all eligible servers in time order."""
        _g, nn, k, mem, mode, ckey, topo = shape
        elig = self.elig_cache[ckey]
        ready: dict[str, dict[int, frozenset[int]]] = {}
        group_of: dict[int, str] = {}
        for n, gl in elig.items():
            group = topology_group(self.n_labels[n], topo)
            if group is None or len(gl) < k:
                continue
            group_of[n] = group
            q = self._qualifying(gl, mem, mode, None)
            if len(q) >= k:
                ready.setdefault(group, {})[n] = frozenset(q[:k])
        events = sorted((e for e in self._end_events(elig) if e[0] in group_of), key=lambda e: e[1])
        states = {}
        for n, when, change in events:
            state = states.get(n)
            if state is None:
                state = states[n] = self.sim_node(elig[n])
            self.sim_release(state, change)
            q = state.qualifying(elig[n], mem, mode, None)
            if len(q) < k:
                continue
            members = ready.setdefault(group_of[n], {})
            members[n] = frozenset(q[:k])
            if len(members) >= nn:
                chosen = list(members)[:nn]
                gpus = frozenset().union(*(members[m] for m in chosen))
                return Reservation(task.id, when, tuple(chosen), gpus)
        return None

    def _end_events(self, elig: dict[int, tuple[int, ...]]) -> Iterable[tuple[int, datetime, tuple]]:
        """``(server, when, change)`` for every end the reservation replays: running tasks at their
        expected end, tasks placed in this pass at ``now + timeout_s``. A running gang ends on
        each of its servers."""
        g_node = self.g_node
        gpu_index = self.gpu_index
        for r in self.running.values():
            by_node: dict[int, list[int]] = {}
            for x in r.gpu_ids:
                g = gpu_index.get(x)
                if g is not None:
                    by_node.setdefault(g_node[g], []).append(g)
            for n, gids in by_node.items():
                if n in elig:
                    yield n, r.expected_end, (gids, r.memory_mb, r.exclusive, True)
        for timeout_s, n, gpus, per_gpu, exclusive in self.placed_ends:
            if n in elig:
                yield n, self.now + timedelta(seconds=timeout_s), (list(gpus), per_gpu, exclusive, False)
