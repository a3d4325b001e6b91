"""One pass of the placement core: every pending task decided once, in queue order.

``Pass`` puts the concerns together over one working state: ``state`` (the cluster as the
pass sees it), ``admission`` (quota, holds, share, waiting, GPUs to keep off), ``search`` and
``gangs`` (finding servers), ``preemption`` (freeing them), ``backfill`` (the head's
reservation) and ``reasons`` (the words). ``_decide`` (one server) and ``_decide_gang``
(several) run the same admission steps; each returns None when the task was placed, else why
not. ``run`` ends the pass: capacity reasons against the final state, the fair-share note,
and queue positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scheduling.placement import reasons
from scheduling.placement.admission import Admission, QuotaHold
from scheduling.placement.backfill import Backfill, Reservation
from scheduling.placement.fit import EXCLUSIVE, GANG, SHARED, WHOLE, mode_of
from scheduling.placement.order import PRIORITY_NAMES, explain_fair_share, fair_share_factors, queue_order
from scheduling.placement.preemption import Preempting
from scheduling.placement.types import PendingInfo, PendingTask, Placement, Plan, RunningTask, Snapshot

# Capacity-blocked tasks tried for the backfill reservation before giving up in a pass.
MAX_RESERVE_ATTEMPTS = 8


class Pass(Preempting, Backfill, Admission):
    """The decisions of one pass over ``snapshot`` (never mutated); ``run()`` returns the plan."""

    def __init__(self, snapshot: Snapshot, timings: list[float] | None = None,
                 on_place: Callable[[Placement], None] | None = None) -> None:
        super().__init__(snapshot)
        self.snap = snapshot
        self.timings = timings
        self.on_place = on_place  # see scheduling.placement.schedule
        self.cfg = snapshot.config
        self.plan = Plan()
        self.preempt_allowed = {p for p, name in PRIORITY_NAMES.items() if name in set(self.cfg.preemption)}

        # Pass-level caches.
        self.elig_cache: dict[tuple, dict[int, tuple[int, ...]]] = {}
        self.static_cache: dict[tuple, str] = {}
        self.nofit: set[tuple] = set()
        self.novictims: set[tuple] = set()
        self.victim_pools: dict[str, dict[int, list[RunningTask]]] = {}
        self.best_cache: dict[tuple, int] = {}
        self.sig_cache: dict[tuple, set[tuple[int, ...]]] = {}
        self.smallest_cache: dict[tuple, int] = {}
        self.reservation: Reservation | None = None
        # Quota holds (rule 3): tenant id -> the hold of its first quota-blocked task.
        self.quota_holds: dict[int, QuotaHold | None] = {}
        # Booked reservations still open or upcoming at ``now`` (see _booked_for).
        self.windows = [w for w in snapshot.reservations if w.ends_at > snapshot.now]
        self.window_by_id = {w.id: w for w in self.windows}
        self.booked_cache: dict[tuple, frozenset[int]] = {}

    # ------------------------------------------------------------------ the pass

    def run(self) -> Plan:
        factors = fair_share_factors(self.snap)
        queue = queue_order(self.snap.pending, factors)
        timings = self.timings
        blocked: dict[int, tuple] = {}  # task id -> shape, for capacity reasons at the end
        why: dict[int, str] = {}
        never: set[int] = set()  # tasks no active server could hold even when idle
        held_back: set[int] = set()  # tasks that fit now but would delay the backfill reservation
        head: PendingTask | None = None  # first task blocked by capacity that can ever fit
        waiting_higher = 0  # blocked tasks ahead, strictly higher priority than the current level
        waiting_total = 0
        level = None
        waiting_before_level = 0
        clock = time.perf_counter
        reserve_attempts = 0
        for task in queue:
            t0 = clock() if timings is not None else 0.0
            if task.priority != level:
                level = task.priority
                waiting_before_level = waiting_total
            waiting_higher = waiting_before_level
            outcome = self._decide(task, head, waiting_higher, waiting_total)
            if outcome is not None:
                kind, value = outcome
                if kind == "reason":
                    why[task.id] = value
                elif kind == "backfill":
                    why[task.id] = value
                    held_back.add(task.id)
                elif kind == "never":
                    why[task.id] = value
                    never.add(task.id)
                elif kind == "wait":
                    why[task.id] = value
                    waiting_total += 1
                else:  # "capacity": value is the shape
                    blocked[task.id] = value
                    waiting_total += 1
                    if head is None:
                        if self.cfg.backfill:
                            # A task that cannot fit even once everything running ends gets no
                            # reservation; try a few before giving up so this stays cheap.
                            if self.reservation is None and reserve_attempts < MAX_RESERVE_ATTEMPTS:
                                reserve_attempts += 1
                                if value[0] == GANG:
                                    self.reservation = self._reserve_gang(task, value)
                                else:
                                    booked = self._booked_for(task) if self.windows else None
                                    self.reservation = self._reserve(
                                        task, value, booked if isinstance(booked, frozenset) else None)
                                if self.reservation is not None:
                                    head = task
                        else:
                            head = task
            if timings is not None:
                timings.append(clock() - t0)

        # Capacity reasons against the final state, once per shape.
        shape_reason: dict[tuple, str] = {}
        for tid, shape in blocked.items():
            r = shape_reason.get(shape)
            if r is None:
                r = shape_reason[shape] = (self._gang_capacity_reason(shape) if shape[0] == GANG
                                           else self._capacity_reason(shape))
            if self.reservation is not None and tid == self.reservation.task_id:
                res = self.reservation
                r = reasons.next_in_line(r, [self.n_name[n] for n in res.nodes], res.time)
            why[tid] = r
        if factors:
            explain_fair_share(queue, factors, why, set(blocked) | held_back, {p.task_id for p in self.plan.placements},
                               self.snap.tenants)

        position = 0
        pending = self.plan.pending
        for task in queue:
            r = why.get(task.id)
            if r is not None:
                position += 1
                pending[task.id] = PendingInfo(reason=r[:reasons.MAX_REASON_CHARS], position=position,
                                               never_fits=task.id in never)
        return self.plan

    # ------------------------------------------------------------------ one task

    def _constraints(self, task: PendingTask) -> tuple[tuple, object]:
        """The task's constraint key (its labels and GPU model) and the servers meeting it, per key once a pass."""
        sel = task.node_selector
        ckey = (tuple(sorted((str(k), str(v)) for k, v in sel.items())) if sel else (), task.gpu_model or "")
        elig = self.elig_cache.get(ckey)
        if elig is None:
            elig = self.elig_cache[ckey] = self._eligible(ckey)
        return ckey, elig

    def _turn_and_keep_off(self, task: PendingTask, head: PendingTask | None, waiting_higher: int,
                           waiting_total: int) -> tuple[str, str] | tuple[frozenset[int] | None, frozenset[int] | None]:
        """Whether an admitted task may search now, as ``_decide`` answers: ("wait", text) behind a
        capacity-blocked head when backfill is off, ("reason", text) when its reservation is not open;
        else ``(booked, excluded)``, the GPUs its search keeps off (``_excluded_for``)."""
        if head is not None and not self.cfg.backfill:
            return ("wait", reasons.waiting_behind(waiting_total, waiting_higher))
        keep_off = self._excluded_for(task)
        if isinstance(keep_off, str):
            return ("reason", keep_off)
        return keep_off

    def _decide(self, task: PendingTask, head: PendingTask | None, waiting_higher: int,
                waiting_total: int) -> tuple[str, object] | None:
        """None when placed, else why not: ("reason", text); ("never", text): no server could ever
        hold it; ("wait", text): behind a capacity-blocked task (backfill off); ("backfill", text): it
        would delay the backfill reservation; ("capacity", shape): no room now."""
        if task.nodes > 1:
            return self._decide_gang(task, head, waiting_higher, waiting_total)
        c = task.gpu_count
        mem = task.memory_mb
        if c < 1 or (mem is not None and mem < 0):
            return ("reason", reasons.nothing_to_place(c, mem))
        mode = WHOLE if mem is None else EXCLUSIVE if task.exclusive else SHARED  # fit.mode_of, inlined

        # Constraints: eligible servers, and whether any could ever hold the request.
        ckey, elig = self._constraints(task)
        shape = (c, mem if mem is not None else 0, mode, ckey)
        r = self.static_cache.get(shape)
        if r is None:
            r = self.static_cache[shape] = self._static_reason(shape, elig)
        if r:
            return ("never", r)

        # Admission: quota (a quota-blocked task takes its tenant's hold), hold, share, wait.
        r = self._quota_reason(task, c, mem, ckey, elig)
        if r is not None:
            if task.tenant_id not in self.quota_holds:
                self.quota_holds[task.tenant_id] = self._quota_hold(task, c, mem, ckey)
            return ("reason", r)
        hold = self.quota_holds.get(task.tenant_id)
        if hold is not None:
            r = self._hold_reason(task, hold, c, mem, ckey)
            if r is not None:
                return ("reason", r)
        r = self._share_reason(task, c)
        if r is not None:
            return ("reason", r)
        keep_off = self._turn_and_keep_off(task, head, waiting_higher, waiting_total)
        if isinstance(keep_off[0], str):
            return keep_off  # type: ignore[return-value]
        booked, excluded = keep_off

        # Search, then reclaim or preempt (both keep off the same GPUs).
        found = self._search(task, c, mem, mode, shape, elig, excluded, None)
        if found is None:
            found = self._reclaim_or_preempt(task, c, mem, mode, elig, excluded)
        if found is None:
            if excluded is not booked and self._search(task, c, mem, mode, shape, elig, booked, None) is not None:
                return ("backfill", reasons.reserved_for_backfill(self.reservation.task_id))  # type: ignore[union-attr]
            if booked is not None and task.reservation_id is None and self._search(
                    task, c, mem, mode, shape, elig, None, None) is not None:
                return ("reason", self._booked_reason(task))
            if booked is not None and task.reservation_id is not None:
                return ("reason", reasons.reservation_in_use(self.window_by_id[task.reservation_id].name))
            return ("capacity", shape)

        n, gpus = found
        if mode == WHOLE:
            per_gpu = min(self.g_total[g] for g in gpus)
            r = self._memory_quota_reason(task, c * per_gpu)
            if r is not None:
                return ("reason", r)
        else:
            per_gpu = mem
        if hold is not None:
            self._use_hold(task, hold, c, per_gpu)
        score = self.take(task, n, gpus, per_gpu, mode)
        self.count_usage(task, c, per_gpu)
        g_id = self.g_id
        self._placed(Placement(
            task_id=task.id, node_id=self.n_id[n], gpu_ids=tuple([g_id[g] for g in gpus]),
            memory_mb=per_gpu, exclusive=mode != SHARED, score=round(score, 3),
        ))
        return None

    def _placed(self, placement: Placement) -> None:
        self.plan.placements.append(placement)
        # A placement after a preemption may use the GPUs it frees: the caller writes those
        # after the preemptions, with the plan.
        if self.on_place is not None and not self.plan.preemptions:
            self.on_place(placement)

    def _decide_gang(self, task: PendingTask, head: PendingTask | None, waiting_higher: int,
                     waiting_total: int) -> tuple[str, object] | None:
        """As ``_decide`` for a gang across ``task.nodes`` servers (placed exclusive, all or nothing).
        Gangs neither take nor respect quota holds."""
        nn, c, mem = task.nodes, task.gpu_count, task.memory_mb
        if c < nn or c % nn or (mem is not None and mem < 0):
            return ("reason", reasons.gang_uneven(c, nn))
        k = c // nn
        mode = mode_of(mem, True)  # whole GPUs, or exclusive

        ckey, elig = self._constraints(task)
        shape = (GANG, nn, k, mem if mem is not None else 0, mode, ckey, task.topology_key)
        r = self.static_cache.get(shape)
        if r is None:
            r = self.static_cache[shape] = self._gang_static_reason(shape, elig)
        if r:
            return ("reason", r)

        r = self._quota_reason(task, c, mem, ckey, elig) or self._share_reason(task, c)
        if r is not None:
            return ("reason", r)
        keep_off = self._turn_and_keep_off(task, head, waiting_higher, waiting_total)
        if isinstance(keep_off[0], str):
            return keep_off  # type: ignore[return-value]
        booked, excluded = keep_off

        found = self._search_gang(task, shape, elig, excluded)
        if found is None:
            found = self._gang_reclaim_or_preempt(task, shape, elig, excluded)
        if found is None:
            if excluded is not booked and self._search_gang(task, shape, elig, booked) is not None:
                return ("backfill", reasons.reserved_for_backfill(self.reservation.task_id))  # type: ignore[union-attr]
            if booked is not None and self._search_gang(task, shape, elig, None) is not None:
                return ("reason", self._booked_reason(task))
            return ("capacity", shape)

        per_gpu = mem if mem is not None else min(self.g_total[g] for _n, gpus in found for g in gpus)
        if mem is None:
            r = self._memory_quota_reason(task, c * per_gpu)
            if r is not None:
                return ("reason", r)
        score = 0.0
        for n, gpus in found:
            score += self.take(task, n, gpus, per_gpu, mode)
        self.count_usage(task, c, per_gpu)
        g_id, n_id = self.g_id, self.n_id
        ranks = tuple((n_id[n], tuple(g_id[g] for g in gpus)) for n, gpus in found)
        self._placed(Placement(
            task_id=task.id, node_id=ranks[0][0], gpu_ids=tuple(g for _n, gids in ranks for g in gids),
            memory_mb=per_gpu, exclusive=True, score=round(score, 3), ranks=ranks,
        ))
        return None
