"""What users see of the GPU servers: each GPU's state in one word (named by
``nodes.gpu_state``), per-server load, and cluster totals. Read-only; shared by
the REST API and portal pages."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from django.db.models import Count, FilteredRelation, Prefetch, Q, QuerySet

from nodes.gpu_state import GPUState, gpu_state
from nodes.models import GPU, Node

GPU_STATES = tuple(GPUState.values)


def _open_allocations() -> FilteredRelation:
    """The open allocations (of a GPU or a server) joined as such: ON ... AND released_at IS NULL,
    the partial index's rows. A FILTER on the aggregate instead joined every allocation ever."""
    return FilteredRelation("allocations", condition=Q(allocations__released_at__isnull=True))


def gpus_with_usage() -> QuerySet[GPU]:
    return GPU.objects.select_related("node").annotate(
        open_allocations=_open_allocations(), active_allocations=Count("open_allocations"))


def with_gpu_counts(nodes: QuerySet[Node]) -> QuerySet[Node]:
    """``nodes`` with ``gpu_n`` (their GPUs) and ``busy_n`` (those holding an open allocation).
    Joining every allocation a server ever had, times its GPUs, took 21-23 s over a year of 200
    servers."""
    return nodes.annotate(
        open_allocations=_open_allocations(),
        gpu_n=Count("gpus", distinct=True),
        busy_n=Count("open_allocations__gpu", distinct=True),
    )


def nodes_with_gpus() -> QuerySet[Node]:
    return Node.objects.prefetch_related(Prefetch("gpus", queryset=gpus_with_usage().order_by("index")))


def state_of(gpu: GPU) -> GPUState:
    """The state of a ``gpus_with_usage()`` row (``nodes.gpu_state`` names it)."""
    return gpu_state(gpu, gpu.node, allocated=bool(gpu.active_allocations))


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
    counts = Counter(state_of(g) for g in gpus_with_usage())
    return {"total": sum(counts.values()), **{state: counts.get(state, 0) for state in GPU_STATES}}
