"""Plain data types of the placement core: its input snapshot and its output plan.

The DB layer (``scheduling.passes``) builds a ``Snapshot`` in a handful of
queries, calls ``scheduling.placement.schedule(snapshot)`` and applies the returned
``Plan``. Nothing here touches the ORM or reads the clock (``Snapshot.now``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from scheduling.placement.config import SchedulerConfig


@dataclass(slots=True)
class GpuState:
    # The snapshot builds these by position (scheduling.passes._GpuRead.build), in this order.
    id: int
    node_id: int
    index: int
    uuid: str
    model_name: str
    memory_total_mb: int
    memory_used_live_mb: int  # as the agent last reported it
    memory_claimed_mb: int  # sum of memory_mb of its active allocations
    exclusive_taken: bool  # an active exclusive allocation holds it
    shared_count: int  # active shared allocations on it
    utilization_pct: int
    temperature_c: int
    idle_since: datetime | None  # None: busy (or never seen idle)
    loaded_models: dict[str, datetime] = field(default_factory=dict)
    # False when cordoned, reserved (flag or config), or health == error.
    schedulable: bool = True


@dataclass(slots=True)
class NodeState:
    id: int
    name: str
    labels: dict[str, str]
    schedulable: bool  # status == active (draining/maintenance/offline are skipped)
    gpus: list[GpuState]


@dataclass(slots=True)
class TenantState:
    id: int
    slug: str
    max_gpus: int
    max_gpu_memory_mb: int
    max_running_tasks: int
    used_gpus: int
    used_gpu_memory_mb: int
    running_tasks: int  # assigned + running
    # 2^(-usage/share) in [0, 1] (scheduling.usage.refresh_fair_share); used when config.fair_share.
    fair_share: float = 1.0


@dataclass(slots=True)
class RunningTask:
    """A task holding GPUs now (assigned or running)."""

    id: int
    tenant_id: int
    priority: int  # tenants.choices.Priority value (higher first)
    workload_class: str  # "online" | "batch"
    node_id: int
    gpu_ids: tuple[int, ...]
    memory_mb: int  # per GPU
    exclusive: bool
    expected_end: datetime  # started (or assigned) + timeout: the latest it can still hold its GPUs


@dataclass(slots=True)
class PendingTask:
    # The snapshot builds these by position (scheduling.task_fields.pending_task): id and
    # created_at, then the fields in this order.
    id: int
    created_at: datetime
    tenant_id: int
    priority: int
    gpu_count: int
    # Per GPU, resolved by the DB layer: the task's own value, else the model's remembered
    # estimate, else None = needs a whole, empty GPU.
    memory_mb: int | None
    exclusive: bool
    workload_class: str
    timeout_s: int
    model_name: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    gpu_model: str = ""  # case-insensitive substring of GpuState.model_name; empty = any
    # A gang across servers: ``gpu_count`` GPUs split evenly over ``nodes`` servers, all
    # sharing the value of the label ``topology_key`` when it is set (e.g. "rack").
    nodes: int = 1
    topology_key: str = ""
    reservation_id: int | None = None  # runs only on this reservation's GPUs, inside its window


@dataclass(slots=True)
class ReservationWindow:
    """One occurrence of an approved reservation: GPUs booked for one tenant over [starts_at, ends_at).
    A weekly reservation is given as its current (or next) occurrence."""

    id: int
    name: str
    tenant_id: int
    gpu_ids: frozenset[int]
    starts_at: datetime
    ends_at: datetime


@dataclass(slots=True)
class Snapshot:
    now: datetime
    config: SchedulerConfig
    nodes: list[NodeState]
    tenants: dict[int, TenantState]
    running: list[RunningTask]
    pending: list[PendingTask]  # any order: the core sorts by priority then FIFO
    reservations: list[ReservationWindow] = field(default_factory=list)  # not yet over at ``now``
    # A ``state.ColumnCache`` to keep each server's working columns in between passes, or None.
    # Only for a caller that never changes a GpuState after handing it in (scheduling.passes
    # builds a new one for every changed row): the cache recognises a server's GPUs by identity.
    columns: object | None = None


@dataclass(slots=True)
class Placement:
    task_id: int
    node_id: int
    gpu_ids: tuple[int, ...]
    memory_mb: int  # per GPU, what the allocation rows record
    exclusive: bool
    score: float = 0.0
    # A gang's servers in rank order, each with its GPUs; ``node_id`` is rank 0's and
    # ``gpu_ids`` all of them. Empty for a task on one server.
    ranks: tuple[tuple[int, tuple[int, ...]], ...] = ()


@dataclass(slots=True)
class Preemption:
    task_id: int  # the victim: returns to pending (attempt + 1) with an event
    by_task_id: int
    reason: str


@dataclass(slots=True)
class PendingInfo:
    reason: str  # human-readable, e.g. "tenant acme at its GPU quota (8/8)"
    position: int  # 1-based position in the queue after this pass
    never_fits: bool = False  # no active server could hold it even idle: waiting will not help


@dataclass(slots=True)
class Plan:
    placements: list[Placement] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    pending: dict[int, PendingInfo] = field(default_factory=dict)
