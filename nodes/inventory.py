"""What users see of the GPU servers: each GPU's state in one word, per-server
load, and cluster totals. Read-only; shared by the REST API and portal pages."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Prefetch, Q, QuerySet

from nodes.models import GPU, GPUHealth, Node, NodeStatus

GPU_STATES = ("free", "allocated", "cordoned", "reserved", "error", "unavailable")


def gpus_with_usage() -> QuerySet[GPU]:
    return GPU.objects.select_related("node").annotate(
        active_allocations=Count("allocations", filter=Q(allocations__released_at__isnull=True))
    )


def nodes_with_gpus() -> QuerySet[Node]:
    return Node.objects.prefetch_related(Prefetch("gpus", queryset=gpus_with_usage().order_by("index")))


def is_reserved_by_config(gpu: GPU, node: Node) -> bool:
    """Listed in the scheduler's ``reserved_gpus`` (by UUID or ``server:index``)."""
    reserved = settings.SCHEDULER.reserved_gpus
    return bool(reserved) and (gpu.uuid in reserved or f"{node.name}:{gpu.index}" in reserved)


def is_reserved(gpu: GPU) -> bool:
    return gpu.reserved or is_reserved_by_config(gpu, gpu.node)


def gpu_state(gpu: GPU) -> str:
    """One word: unavailable (its server is not active), error, cordoned, reserved,
    allocated (held by a task) or free. Needs ``gpus_with_usage()`` rows."""
    if gpu.node.status != NodeStatus.ACTIVE:
        return "unavailable"
    if gpu.health == GPUHealth.ERROR:
        return "error"
    if gpu.cordoned:
        return "cordoned"
    if is_reserved(gpu):
        return "reserved"
    if getattr(gpu, "active_allocations", 0):
        return "allocated"
    return "free"


@dataclass(frozen=True)
class NodeLoad:
    allocated_gpus: int
    total_gpus: int
    mean_utilization_pct: float
    load_score: float  # 0.4 * share of GPUs allocated + 0.6 * mean utilisation (seed 000)


def node_load(node: Node) -> NodeLoad:
    gpus = list(node.gpus.all())
    total = len(gpus)
    allocated = sum(1 for g in gpus if getattr(g, "active_allocations", 0))
    util = sum(g.utilization_pct for g in gpus) / total if total else 0.0
    worker_factor = allocated / total if total else 0.0
    return NodeLoad(allocated, total, round(util, 1), round(0.4 * worker_factor + 0.6 * util / 100, 3))


def gpu_totals() -> dict[str, int]:
    counts = Counter(gpu_state(g) for g in gpus_with_usage())
    return {"total": sum(counts.values()), **{state: counts.get(state, 0) for state in GPU_STATES}}
