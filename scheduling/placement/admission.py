"""Admission: the checks a task meets before any server is searched, shared by every kind of task.

In order: the tenant's quota (running tasks, GPUs, GPU memory; a whole-GPU request counts
the smallest GPU it could get), the tenant's *quota hold* (the first quota-blocked task of a
tenant protects its claim on the quota freed later from the tenant's narrower tasks), the
online/batch share, the no-backfill wait, and the GPUs the task must keep off (booked
reservations of other tenants, the backfill reservation when the task would outlive it).
``planner.Pass._decide`` and ``_decide_gang`` call the same helpers here, so each rule is
written once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from scheduling.placement import reasons
from scheduling.placement.backfill import Reservation
from scheduling.placement.state import WorkingState
from scheduling.placement.types import PendingTask, ReservationWindow, Snapshot


class QuotaHold:
    """A quota-blocked task's claim on its tenant's future headroom (rule 3).

    ``time``: the earliest moment the tenant's running tasks (and those placed earlier in the
    pass) will have freed enough quota for it; ``spare``: what the tenant may still hold at
    that moment beside it (GPUs, memory, running tasks). A later task of the tenant that
    would still run at ``time`` must fit in ``spare`` and uses it up.
    """

    __slots__ = ("spare", "task_id", "time")

    def __init__(self, task_id: int, when: datetime, spare: list[int]) -> None:
        self.task_id = task_id
        self.time = when
        self.spare = spare


class Admission(WorkingState):
    """Quota, share, waiting and exclusion checks (mixed into ``planner.Pass``)."""

    snap: Snapshot
    smallest_cache: dict[tuple, int]
    quota_holds: dict[int, QuotaHold | None]
    windows: list[ReservationWindow]
    window_by_id: dict[int, ReservationWindow]
    booked_cache: dict[tuple, frozenset[int]]
    reservation: Reservation | None

    # ------------------------------------------------------------------ the shared steps

    def _quota_reason(self, task: PendingTask, c: int, mem: int | None, ckey: tuple,
                      elig: dict[int, tuple[int, ...]]) -> str | None:
        """The tenant's quota: running tasks + 1, GPUs held + ``c`` and GPU memory held + ``c``
        GPUs' memory within its limits. A whole-GPU request (``mem`` None) is checked with the
        smallest GPU it could get, before any search (or preemption) is spent on it; the GPUs
        it is given are checked again by ``_memory_quota_reason``."""
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        used_gpus, _used_mem, running = self.t_usage[task.tenant_id]
        if running + 1 > tenant.max_running_tasks:
            return reasons.running_quota(tenant.slug, running, tenant.max_running_tasks)
        if used_gpus + c > tenant.max_gpus:
            return reasons.gpu_quota(tenant.slug, used_gpus, tenant.max_gpus, c)
        if mem is None:
            smallest = self.smallest_cache.get(ckey)
            if smallest is None:
                total = self.g_total
                smallest = self.smallest_cache[ckey] = min(total[g] for gl in elig.values() for g in gl)
            return self._memory_quota_reason(task, c * smallest)
        return self._memory_quota_reason(task, c * mem)

    def _memory_quota_reason(self, task: PendingTask, need_mb: int) -> str | None:
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        used_mem = self.t_usage[task.tenant_id][1]
        if used_mem + need_mb <= tenant.max_gpu_memory_mb:
            return None
        return reasons.memory_quota(tenant.slug, used_mem, tenant.max_gpu_memory_mb, need_mb)

    def _excluded_for(self, task: PendingTask) -> tuple[frozenset[int] | None, frozenset[int] | None] | str:
        """``(booked, excluded)``: the GPUs (internal indexes) ``task`` must keep off, or the
        reason it cannot run now (its own reservation is not open). ``booked``: reservations of
        other tenants (or every GPU outside its own reservation); ``excluded``: ``booked`` plus
        the backfill reservation's GPUs when the task would outlive it (``booked`` itself when not)."""
        booked = self._booked_for(task) if self.windows or task.reservation_id is not None else None
        if isinstance(booked, str):
            return booked
        res = self.reservation
        if res is not None and self.now + timedelta(seconds=task.timeout_s) > res.time:
            return booked, (res.gpus if booked is None else self._union(booked, res.gpus))
        return booked, booked

    # ------------------------------------------------------------------ quota holds

    def _ends_by(self, task: PendingTask, when: datetime) -> bool:
        return self.now + timedelta(seconds=task.timeout_s) <= when

    def _need_mb(self, c: int, mem: int | None, ckey: tuple) -> int:
        # A whole-GPU request claims at least the smallest GPU it could get.
        return c * (mem if mem is not None else self.smallest_cache.get(ckey, 0))

    def _hold_reason(self, task: PendingTask, hold: QuotaHold, c: int, mem: int | None, ckey: tuple) -> str | None:
        """Why its tenant's quota ``hold`` keeps ``task`` waiting (None: it does not): the task
        would still run at the hold's time and does not fit in the headroom beside it."""
        if self._ends_by(task, hold.time):
            return None
        spare = hold.spare
        if c <= spare[0] and self._need_mb(c, mem, ckey) <= spare[1] and spare[2] >= 1:
            return None
        return reasons.quota_hold(hold.task_id, hold.time)

    def _use_hold(self, task: PendingTask, hold: QuotaHold, c: int, per_gpu: int) -> None:
        """A task placed beside its tenant's ``hold`` that still runs at the hold's time uses up
        the headroom beside it."""
        if not self._ends_by(task, hold.time):
            hold.spare[0] -= c
            hold.spare[1] -= c * per_gpu
            hold.spare[2] -= 1

    def _quota_hold(self, task: PendingTask, c: int, mem: int | None, ckey: tuple) -> QuotaHold | None:
        """When ``task``'s tenant will have freed enough quota for it, replaying the ends of its
        running tasks; None when its quota could never hold it (then it protects nothing)."""
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        need = (c, self._need_mb(c, mem, ckey), 1)
        limits = (tenant.max_gpus, tenant.max_gpu_memory_mb, tenant.max_running_tasks)
        if any(n > lim for n, lim in zip(need, limits, strict=True)):
            return None
        used = list(self.t_usage[task.tenant_id])
        ends = [(r.expected_end, len(r.gpu_ids), r.memory_mb * len(r.gpu_ids))
                for r in self.running.values() if r.tenant_id == task.tenant_id]
        ends += [(self.now + timedelta(seconds=t), k, m) for t, k, m in self.placed_by_tenant.get(task.tenant_id, ())]
        ends.sort(key=lambda e: e[0])
        for when, gpus, memory in ends:
            used[0] -= gpus
            used[1] -= memory
            used[2] -= 1
            if all(u + n <= lim for u, n, lim in zip(used, need, limits, strict=True)):
                return QuotaHold(task.id, when, [lim - u - n for u, n, lim in zip(used, need, limits, strict=True)])
        return None

    # ------------------------------------------------------------------ online/batch share

    def _other(self, cls: str) -> str:
        return "batch" if cls == "online" else "online"

    def _share_reason(self, task: PendingTask, c: int) -> str | None:
        """The online/batch split: a class holds at most its cap, plus (with borrowing) the
        other class's idle share; a share of the whole cluster is no limit."""
        cls = task.workload_class
        class_cap = self.class_cap
        if cls not in class_cap:
            return None
        used = self.class_used[cls]
        cap = limit = class_cap[cls]
        borrowing = self.cfg.allow_borrowing
        if borrowing:
            other = self._other(cls)
            limit += max(0, class_cap[other] - self.class_used[other])
        if used + c <= limit or self.class_share[cls] >= 1.0:
            # A share of the whole cluster is no limit: capacity will say why it waits.
            return None
        return reasons.class_share(cls, self.class_share[cls], used, cap, c, other if borrowing else None)

    # ------------------------------------------------------------------ booked reservations
    #
    # An approved reservation (``snapshot.reservations``) books GPUs for one tenant over
    # [starts_at, ends_at). Inside the window only that tenant's tasks may use them; before
    # it, another tenant's task may use them only if it ends (by its timeout) by the start,
    # so nothing can still hold them when the window opens. A task that names a reservation
    # runs only on its GPUs and only inside its window.

    def _booked_for(self, task: PendingTask) -> frozenset[int] | str | None:
        """GPUs (internal indexes) this task must keep off, None for none, or a reason to wait."""
        now = self.now
        if task.reservation_id is not None:
            w = self.window_by_id.get(task.reservation_id)
            if w is None:
                return reasons.reservation_inactive(task.reservation_id)
            if w.tenant_id != task.tenant_id:
                return reasons.reservation_of_another_tenant(w.name)
            if now < w.starts_at:
                return reasons.reservation_not_started(w.name, w.starts_at - now)
            key: tuple = ("only", w.id)
            hit = self.booked_cache.get(key)
            if hit is None:
                own = self._window_gpus(w)
                hit = self.booked_cache[key] = frozenset(g for g in range(len(self.g_id)) if g not in own)
            return hit
        end = now + timedelta(seconds=task.timeout_s)
        blocking = tuple(w.id for w in self.windows
                         if w.tenant_id != task.tenant_id and (w.starts_at <= now or end > w.starts_at))
        if not blocking:
            return None
        hit = self.booked_cache.get(blocking)
        if hit is None:
            gpus: set[int] = set()
            for wid in blocking:
                gpus |= self._window_gpus(self.window_by_id[wid])
            hit = self.booked_cache[blocking] = frozenset(gpus)
        return hit

    def _window_gpus(self, w: ReservationWindow) -> frozenset[int]:
        index = self.gpu_index
        return frozenset(index[g] for g in w.gpu_ids if g in index)

    def _union(self, a: frozenset[int], b: frozenset[int]) -> frozenset[int]:
        key = ("union", id(a), id(b))
        hit = self.booked_cache.get(key)
        if hit is None:
            hit = self.booked_cache[key] = a | b
        return hit

    def _booked_reason(self, task: PendingTask) -> str:
        now = self.now
        end = now + timedelta(seconds=task.timeout_s)
        for w in self.windows:
            if w.tenant_id == task.tenant_id:
                continue
            if w.starts_at <= now:
                return reasons.booked_now(w.name, w.ends_at)
            if end > w.starts_at:
                return reasons.booked_from(w.name, w.starts_at)
        return reasons.booked()
