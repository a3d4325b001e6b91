"""Queue order: priority, then (with fair share) the tenant's factor, then FIFO.

Pending tasks are taken by priority (CRITICAL > HIGH > NORMAL > LOW), then (with
``config.fair_share``) by their tenant's fair-share factor, higher first
(``TenantState.fair_share``, 2^(-usage/share) computed by the DB layer), then FIFO by
``created_at``, then ``id``. ``explain_fair_share`` adds the "fair share: ..." note to the
reason of a task left waiting while a later task of a tenant with a higher factor went first.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from scheduling.placement import reasons
from scheduling.placement.types import PendingTask, Snapshot, TenantState

# Same values as tenants.choices.Priority; repeated here so the core imports no Django models.
PRIORITY_NAMES = {0: "LOW", 1: "NORMAL", 2: "HIGH", 3: "CRITICAL"}
LOW = 0


def queue_order(tasks: Iterable[PendingTask], factors: dict[int, float] | None = None) -> list[PendingTask]:
    """Priority first (higher first), then the tenant's fair-share factor (higher first) when
    ``factors`` is given, then FIFO by creation time, then id."""
    if not factors:
        return sorted(tasks, key=lambda t: (-t.priority, t.created_at, t.id))
    return sorted(tasks, key=lambda t: (-t.priority, -factors.get(t.tenant_id, 1.0), t.created_at, t.id))


def fair_share_factors(snapshot: Snapshot) -> dict[int, float] | None:
    """Tenant id -> fair-share factor when the policy is on, else None."""
    if not snapshot.config.fair_share:
        return None
    return {tid: t.fair_share for tid, t in snapshot.tenants.items()}


def snapshot_order(snapshot: Snapshot) -> list[PendingTask]:
    """The order a pass takes the snapshot's pending tasks in."""
    return queue_order(snapshot.pending, fair_share_factors(snapshot))


def explain_fair_share(queue: list[PendingTask], factors: dict[int, float], reasons_by_task: dict[int, str],
                       waiting: set[int], placed_ids: set[int], tenants: dict[int, TenantState]) -> None:
    """Say so when fair share let a later task of a tenant with a higher factor go first.

    ``waiting``: the tasks left waiting for capacity (blocked, or held back by the backfill
    reservation); their reasons in ``reasons_by_task`` get the note."""
    # Per priority: placed tasks by factor (highest first) with the latest (created_at, id)
    # among those of at least that factor, so each waiting task is one bisect.
    levels: dict[int, list[tuple[float, tuple]]] = {}
    for t in queue:
        if t.id in placed_ids:
            levels.setdefault(t.priority, []).append((factors.get(t.tenant_id, 1.0), (t.created_at, t.id)))
    latest: dict[int, tuple[list[float], list[tuple]]] = {}
    for prio, items in levels.items():
        items.sort(key=lambda x: -x[0])
        keys, running_max, best = [], [], None
        for factor, when in items:
            best = when if best is None or when > best else best
            keys.append(-factor)
            running_max.append(best)
        latest[prio] = (keys, running_max)
    for t in queue:
        r = reasons_by_task.get(t.id)
        if r is None or t.priority not in latest or t.id not in waiting:
            continue
        keys, running_max = latest[t.priority]
        own = factors.get(t.tenant_id, 1.0)
        k = bisect.bisect_left(keys, -own)  # placed tasks with a strictly higher factor
        if k and running_max[k - 1] > (t.created_at, t.id):
            tenant = tenants.get(t.tenant_id)
            name = tenant.slug if tenant is not None else f"#{t.tenant_id}"
            reasons_by_task[t.id] = reasons.fair_share(r, name, own)
