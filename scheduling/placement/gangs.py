"""Gangs across servers: ``gpu_count / nodes`` GPUs on each of ``nodes`` servers, all or nothing.

A gang's shape is ``(GANG, servers, GPUs per server, memory, mode, constraints, topology
label)``. Gangs are exclusive (a shared request is placed as exclusive); with a
``topology_key`` every server must carry that label with the same value. The servers able to
hold one rank now are found level by level like the single-server scan (fullest first with
binpack) and grouped by topology value; the first complete group wins, in packing order.
Backfill (``backfill.Backfill._reserve_gang``) and preemption (``preemption``) pick servers
for a gang the same way.
"""

from __future__ import annotations

from scheduling.placement import reasons
from scheduling.placement.search import Search
from scheduling.placement.types import PendingTask


def topology_group(labels: dict[str, str], topo: str) -> str | None:
    """A server's topology group for ``topo`` ("" when the gang has none; None: the server
    lacks the label, so it cannot take part)."""
    if not topo:
        return ""
    value = labels.get(topo)
    return None if value is None else str(value)


class Gangs(Search):
    """Gang search and gang reasons (mixed into ``planner.Pass``)."""

    def _gang_static_reason(self, shape: tuple, elig: dict[int, tuple[int, ...]]) -> str:
        """Why no set of active servers could ever hold this gang ("" when one could)."""
        _g, nn, k, mem, mode, ckey, topo = shape
        r = self._static_reason((k, mem, mode, ckey), elig)
        if r:
            return r
        need = self.margin + mem
        total = self.g_total
        n_labels = self.n_labels
        groups: dict[str, int] = {}
        for n, gl in elig.items():
            group = topology_group(n_labels[n], topo)
            if group is not None and sum(1 for g in gl if total[g] >= need) >= k:
                groups[group] = groups.get(group, 0) + 1
        best = max(groups.values(), default=0)
        if best < nn:
            return reasons.gang_never(shape, best)
        return ""

    def _gang_fits(self, shape: tuple, elig: dict[int, tuple[int, ...]], excluded: frozenset[int] | None,
                   model: str, stop: bool) -> dict[str, list[tuple[int, tuple[int, ...]]]]:
        """Servers able to hold one rank now, by topology group, in packing order (the fullest
        that fits first with binpack). With ``stop``, returns as soon as a group is complete."""
        _g, nn, k, mem, mode, _ckey, topo = shape
        n_room = self.n_room
        n_labels = self.n_labels
        qualifying = self._qualifying
        room_needed = mem + self.margin
        groups: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        levels = range(k, self.max_k + 1) if self.binpack else range(self.max_k, k - 1, -1)
        for level in levels:
            for n in self.buckets[level]:
                gl = elig.get(n)
                if gl is None or len(gl) < k or n_room[n] < room_needed:
                    continue
                group = topology_group(n_labels[n], topo)
                if group is None:
                    continue
                q = qualifying(gl, mem, mode, excluded)
                if len(q) < k:
                    continue
                members = groups.setdefault(group, [])
                members.append((n, self._pick(q, k, model)[1]))
                if stop and len(members) == nn:
                    return {group: members}
        return groups

    def _search_gang(self, task: PendingTask, shape: tuple, elig: dict[int, tuple[int, ...]],
                     excluded: frozenset[int] | None) -> list[tuple[int, tuple[int, ...]]] | None:
        """``nodes`` servers (rank order) with their GPUs, all in one topology group, or None."""
        key = (shape, id(excluded) if excluded is not None else 0)
        if key in self.nofit:
            return None
        nn = shape[1]
        for members in self._gang_fits(shape, elig, excluded, task.model_name, stop=True).values():
            if len(members) >= nn:
                return members[:nn]
        self.nofit.add(key)
        return None

    def _gang_capacity_reason(self, shape: tuple) -> str:
        groups = self._gang_fits(shape, self.elig_cache[shape[5]], None, "", stop=False)
        return reasons.gang_capacity(shape, max((len(m) for m in groups.values()), default=0))
