"""Current rows, formatted for live pages: what the websocket consumers send and
what the admin pages render first, so the two always agree.

Plain functions over the ORM (sync); consumers call them through
``database_sync_to_async``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from django.utils import timezone

from nodes import inventory
from nodes.gpu_state import GPUState, gpu_state
from nodes.models import GPU, Node
from scheduling.models import Allocation, Task
from scheduling.quotas import usage_of
from tenants.choices import Priority
from tenants.models import Limits, Quota, QuotaGrant, Tenant, effective_limits

# Tenant colours on the cluster grid: blues, purples, magentas and teal only, so an allocated
# GPU never looks like a state (free is green, cordoned amber, error red, unavailable/reserved grey).
TENANT_HUES = (205, 265, 185, 305, 230, 285, 195, 250, 220, 295)
STATE_HUES = {GPUState.FREE: 120, GPUState.CORDONED: 40, GPUState.ERROR: 0}


def tenant_hue(tenant_id: int) -> int:
    return TENANT_HUES[tenant_id % len(TENANT_HUES)]


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def node_rows(node_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    nodes = Node.objects.all().order_by("name")
    if node_ids is not None:
        nodes = nodes.filter(pk__in=list(node_ids))
    nodes = inventory.with_gpu_counts(nodes)
    now = timezone.now()
    rows = []
    for node in nodes:
        age = (now - node.last_heartbeat_at).total_seconds() if node.last_heartbeat_at else None
        rows.append({
            "id": node.pk, "name": node.name, "status": node.status, "status_reason": node.status_reason,
            "heartbeat_age_s": None if age is None else round(age, 1), "heartbeat_overdue": node.heartbeat_overdue,
            "gpus": node.gpu_n, "gpus_busy": node.busy_n,
        })
    return rows


def gpu_rows(node_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Every GPU of these servers (all servers when None) with its current tasks."""
    gpus = GPU.objects.select_related("node").order_by("node__name", "index")
    allocs = Allocation.objects.filter(released_at__isnull=True)
    if node_ids is not None:
        ids = list(node_ids)
        gpus = gpus.filter(node_id__in=ids)
        allocs = allocs.filter(node_id__in=ids)
    on_gpu: dict[int, list[dict[str, Any]]] = {}
    for a in allocs.order_by("allocated_at", "id").values(
        "gpu_id", "task_id", "task__name", "task__tenant_id", "task__tenant__slug", "memory_mb"
    ):
        on_gpu.setdefault(a["gpu_id"], []).append({
            "id": a["task_id"], "name": a["task__name"], "tenant_id": a["task__tenant_id"],
            "tenant": a["task__tenant__slug"], "memory_mb": a["memory_mb"],
        })
    rows = []
    for gpu in gpus:
        tasks = on_gpu.get(gpu.pk, [])
        first = tasks[0] if tasks else None
        rows.append({
            "id": gpu.pk, "node_id": gpu.node_id, "node": gpu.node.name, "node_status": gpu.node.status,
            "index": gpu.index, "model": gpu.model_name, "utilization_pct": gpu.utilization_pct,
            "memory_used_mb": gpu.memory_used_mb, "memory_total_mb": gpu.memory_total_mb,
            "memory_pct": round(100 * gpu.memory_used_mb / gpu.memory_total_mb) if gpu.memory_total_mb else 0,
            "temperature_c": gpu.temperature_c, "power_w": gpu.power_w, "health": gpu.health,
            "cordoned": gpu.cordoned, "cordon_reason": gpu.cordon_reason, "reserved": gpu.reserved,
            "state": gpu_state(gpu, gpu.node, allocated=bool(tasks)),
            "tasks": tasks,
            "task": f"#{first['id']} {first['name']}" if first else "",
            "tenant": ", ".join(sorted({t["tenant"] for t in tasks})),
            "tenant_id": first["tenant_id"] if first else None,
            "tenant_hue": tenant_hue(first["tenant_id"]) if first else None,
        })
    return rows


def task_rows(task_ids: Iterable[int]) -> list[dict[str, Any]]:
    tasks = Task.objects.filter(pk__in=list(task_ids)).select_related("tenant", "node").order_by("pk")
    return [
        {
            "id": t.pk, "name": t.name, "tenant_id": t.tenant_id, "tenant": t.tenant.slug,
            "status": t.status, "status_label": t.get_status_display(),
            "priority": t.priority, "priority_label": Priority(t.priority).label,
            "gpu_count": t.gpu_count, "node": t.node.name if t.node else "",
            "pending_reason": t.pending_reason, "queue_position": t.queue_position,
            "exit_code": t.exit_code, "failure_reason": t.failure_reason, "oom": t.oom, "attempt": t.attempt,
            "created_at": _iso(t.created_at), "assigned_at": _iso(t.assigned_at),
            "started_at": _iso(t.started_at), "finished_at": _iso(t.finished_at),
        }
        for t in tasks
    ]


def tenant_usage_rows(tenant_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Usage beside limits, for the quota pages."""
    ids = sorted(set(tenant_ids))
    usages = usage_of(ids)
    quotas = {q.tenant_id: q for q in Quota.objects.filter(tenant_id__in=ids)}
    slugs = dict(Tenant.objects.filter(pk__in=ids).values_list("pk", "slug"))
    # Limits shown are effective ones: base quota + grants active now.
    now = timezone.now()
    active: dict[int, list[QuotaGrant]] = {}
    for g in QuotaGrant.objects.filter(tenant_id__in=ids, state=QuotaGrant.State.APPROVED, starts_at__lte=now,
                                       ends_at__gt=now):
        active.setdefault(g.tenant_id, []).append(g)
    rows = []
    for tid in ids:
        q = quotas.get(tid)
        eff = None if q is None else effective_limits(
            Limits(q.max_gpus, q.max_gpu_memory_mb, q.max_running_tasks), active.get(tid, ()), now)
        rows.append({
            "id": tid, "slug": slugs.get(tid, ""),
            "used": dataclasses.asdict(usages[tid]),
            "limits": None if q is None else {
                "gpus": eff.max_gpus, "gpu_memory_mb": eff.max_gpu_memory_mb,
                "running_tasks": eff.max_running_tasks, "pending_tasks": q.max_pending_tasks,
            },
        })
    return rows
