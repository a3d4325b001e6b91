"""Small builders for placement-core snapshots, so each test states only what matters to it."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

from scheduling.placement import GpuState, NodeState, PendingTask, RunningTask, SchedulerConfig, Snapshot, TenantState

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
H100 = "NVIDIA H100 80GB HBM3"
_ids = itertools.count(1000)


def gpu(node_id: int, index: int, *, total: int = 80_000, model: str = H100, claimed: int = 0, live: int = 0,
        exclusive_taken: bool = False, shared: int = 0, util: int = 0, temp: int = 40,
        idle_s: float | None = 600, loaded: tuple[str, ...] = (), schedulable: bool = True) -> GpuState:
    return GpuState(
        id=node_id * 100 + index, node_id=node_id, index=index, uuid=f"GPU-{node_id}-{index}", model_name=model,
        memory_total_mb=total, memory_used_live_mb=live, memory_claimed_mb=claimed,
        exclusive_taken=exclusive_taken, shared_count=shared, utilization_pct=util, temperature_c=temp,
        idle_since=None if idle_s is None else NOW - timedelta(seconds=idle_s),
        loaded_models=dict.fromkeys(loaded, NOW), schedulable=schedulable,
    )


def node(node_id: int, gpus: int = 8, *, labels: dict[str, str] | None = None, schedulable: bool = True,
         **gpu_kwargs) -> NodeState:
    return NodeState(id=node_id, name=f"gpu-{node_id:02d}", labels=labels or {}, schedulable=schedulable,
                     gpus=[gpu(node_id, i, **gpu_kwargs) for i in range(gpus)])


def tenant(tid: int = 1, slug: str = "acme", *, max_gpus: int = 1000, max_mem: int = 10**9, max_tasks: int = 1000,
           used_gpus: int = 0, used_mem: int = 0, running: int = 0) -> TenantState:
    return TenantState(id=tid, slug=slug, max_gpus=max_gpus, max_gpu_memory_mb=max_mem, max_running_tasks=max_tasks,
                       used_gpus=used_gpus, used_gpu_memory_mb=used_mem, running_tasks=running)


def task(tid: int | None = None, *, tenant_id: int = 1, priority: int = 1, gpus: int = 1,
         memory: int | None = 10_000, exclusive: bool = True, cls: str = "batch", timeout_s: int = 3600,
         age_s: float = 0, model: str = "", selector: dict[str, str] | None = None,
         gpu_model: str = "", nodes: int = 1, topology_key: str = "") -> PendingTask:
    return PendingTask(
        id=tid if tid is not None else next(_ids), tenant_id=tenant_id, priority=priority,
        created_at=NOW - timedelta(seconds=age_s), gpu_count=gpus, memory_mb=memory, exclusive=exclusive,
        workload_class=cls, timeout_s=timeout_s, model_name=model, node_selector=selector or {},
        gpu_model=gpu_model, nodes=nodes, topology_key=topology_key,
    )


def occupy(nodes: list[NodeState], running_id: int, node_id: int, indexes: list[int], *, tenant_id: int = 1,
           priority: int = 1, cls: str = "batch", memory: int = 80_000, exclusive: bool = True,
           ends_in_s: float = 3600) -> RunningTask:
    """Mark GPUs as held by a running task and return that task (the snapshot must list it)."""
    target = next(n for n in nodes if n.id == node_id)
    gpu_ids = []
    for i in indexes:
        g = target.gpus[i]
        g.memory_claimed_mb += memory
        g.memory_used_live_mb += memory
        if exclusive:
            g.exclusive_taken = True
        else:
            g.shared_count += 1
        gpu_ids.append(g.id)
    return RunningTask(id=running_id, tenant_id=tenant_id, priority=priority, workload_class=cls, node_id=node_id,
                       gpu_ids=tuple(gpu_ids), memory_mb=memory, exclusive=exclusive,
                       expected_end=NOW + timedelta(seconds=ends_in_s))


def snapshot(nodes: list[NodeState], pending: list[PendingTask], *, tenants: list[TenantState] | None = None,
             running: list[RunningTask] | None = None, **config) -> Snapshot:
    base = {"online_share": 1.0, "batch_share": 1.0}
    base.update(config)
    # Shares of 1.0 each keep the split out of the way (build_config would refuse them; replace does not check).
    cfg = dataclasses.replace(SchedulerConfig(), **base)
    ts = tenants if tenants is not None else [tenant()]
    return Snapshot(now=NOW, config=cfg, nodes=nodes, tenants={t.id: t for t in ts}, running=running or [],
                    pending=pending)
