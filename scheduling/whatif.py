"""What-if: what the next pass would do with a proposed change, without writing anything.

The change (a tenant's new quota, an approved grant, an approved reservation) is written
inside a transaction that is always rolled back; the snapshot is loaded by the pass's own
loader (``scheduling.passes.load_snapshot``) and decided by the placement core, so the
answer is what the next pass would do after saving the same change, minus whatever
happens in between. Nothing is ever killed by a quota change: running tasks above the
new limits are listed as "over quota", they keep running.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils.translation import gettext

from scheduling import reservations
from scheduling.models import Task
from scheduling.passes import load_snapshot
from scheduling.placement import schedule
from tenants.models import Quota, QuotaGrant

# How many waiting tasks the answer lists (the queue may be long).
MAX_WAITING_LISTED = 100


class _Rollback(Exception):
    pass


def simulate(apply: Callable[[], Any]) -> dict[str, Any]:
    """Run ``apply()`` (which writes the proposed change), decide a pass, roll it all back.

    ``apply`` returns a reservation id when the change is a reservation (its overlapping
    running tasks are listed). Its own errors (a conflict) propagate; nothing is written
    either way."""

    out: dict[str, Any] = {}
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT now()")
                now: datetime = cursor.fetchone()[0]
            baseline = schedule(load_snapshot(now).snapshot)
            applied = apply()
            loaded = load_snapshot(now)
            plan = schedule(loaded.snapshot)
            reservation_id = applied if isinstance(applied, int) else None
            out = _describe(loaded, plan, baseline, now, reservation_id)
            raise _Rollback
    except _Rollback:
        pass
    return out


def _describe(loaded, plan, baseline, now: datetime, reservation_id: int | None) -> dict[str, Any]:
    snap = loaded.snapshot
    pending_ids = [t.id for t in snap.pending]
    running_ids = [r.id for r in snap.running]
    names = dict(Task.objects.filter(pk__in=pending_ids + running_ids).values_list("pk", "name"))
    slugs = {t.id: t.slug for t in snap.tenants.values()}
    tenant_of = {t.id: t.tenant_id for t in snap.pending}
    before = {p.task_id for p in baseline.placements}
    start = [{"task": p.task_id, "name": names.get(p.task_id, ""), "tenant": slugs.get(tenant_of[p.task_id]),
              "placement": loaded.placement_reason(p), "also_without_change": p.task_id in before}
             for p in plan.placements]
    waiting = sorted(plan.pending.items(), key=lambda kv: kv[1].position)
    keep_waiting = [{"task": tid, "name": names.get(tid, ""), "tenant": slugs.get(tenant_of.get(tid)),
                     "position": info.position, "reason": info.reason}
                    for tid, info in waiting[:MAX_WAITING_LISTED]]
    no_longer = sorted(before - {p.task_id for p in plan.placements})
    over = []
    for t in snap.tenants.values():
        problems = []
        if t.used_gpus > t.max_gpus:
            problems.append(f"GPUs {t.used_gpus} > {t.max_gpus}")
        if t.used_gpu_memory_mb > t.max_gpu_memory_mb:
            problems.append(f"GPU memory {t.used_gpu_memory_mb} MB > {t.max_gpu_memory_mb} MB")
        if t.running_tasks > t.max_running_tasks:
            problems.append(f"running tasks {t.running_tasks} > {t.max_running_tasks}")
        if problems:
            over.append({"tenant": t.slug, "over": problems, "running_tasks": sorted(
                r.id for r in snap.running if r.tenant_id == t.id)})
    overlapping = []
    window = next((w for w in snap.reservations if w.id == reservation_id), None)
    if window is not None:
        for r in snap.running:
            held = set(r.gpu_ids) & window.gpu_ids
            if r.tenant_id != window.tenant_id and held and r.expected_end > window.starts_at:
                overlapping.append({"task": r.id, "name": names.get(r.id, ""), "tenant": slugs.get(r.tenant_id),
                                    "may_run_until": r.expected_end, "gpus": sorted(held)})
    return {
        "now": now, "would_start": start, "keep_waiting": keep_waiting, "waiting_count": len(plan.pending),
        "would_no_longer_start": no_longer, "over_quota": over, "overlapping_running": overlapping,
        "note": gettext("Nothing was saved. Running tasks are never killed by a quota change; "
                        "over-quota tenants only get no new placements until usage falls."),
    }


# --- proposed changes ---------------------------------------------------------------------------

def quota_change(tenant_id: int, **limits: int) -> Callable[[], None]:
    """A tenant's quota with some limits changed (max_gpus, max_gpu_memory_mb, max_running_tasks)."""

    def apply() -> None:
        quota, _ = Quota.objects.get_or_create(tenant_id=tenant_id)
        for key, value in limits.items():
            setattr(quota, key, value)
        quota.save()

    return apply


def grant_approval(grant_id: int) -> Callable[[], None]:
    """Approving a requested grant (or any grant, as approved)."""

    def apply() -> None:
        QuotaGrant.objects.filter(pk=grant_id).update(state=QuotaGrant.State.APPROVED)

    return apply


def new_grant(**fields: Any) -> Callable[[], None]:

    def apply() -> None:
        QuotaGrant.objects.create(state=QuotaGrant.State.APPROVED, reason=fields.pop("reason", "what-if"),
                                  **fields)

    return apply


def reservation_approval(reservation_id: int) -> Callable[[], int]:
    """Approving a requested reservation: its GPUs booked as approval would book them."""

    def apply() -> int:
        reservations.decide(reservation_id, approve=True, by=None, note="what-if")
        return reservation_id

    return apply
