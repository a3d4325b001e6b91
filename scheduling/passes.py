"""One scheduling pass: lock, load a snapshot, decide with the placement core, apply.

``run_pass()`` is the only writer of new allocations. Passes anywhere in the
cluster (runscheduler, django-q workers, several web nodes) serialise on the
``SchedulerLock`` row named "scheduler", row-locked (by the UPDATE that records
the holder, ``scheduling.lock``) inside the pass's transaction: a holder that crashes loses the lock with its
connection, and a pass commits all of its decisions or none.

The snapshot is read in a fixed handful of queries whatever the cluster size
(nodes, GPUs with their active allocations aggregated, holding tasks with their
GPU ids, tenants with quotas, the pending queue with model memory estimates),
and the plan is written with set-based statements (``unnest`` of arrays): one
statement placing tasks (their UPDATE, events and allocations), one UPDATE for
changed pending reasons. The placements are written in batches while the core
is still deciding (``_Streamer``, ``lifecycle.PlacementStream``), and the GPU
rows are read while the rest of the snapshot is parsed (``_GpuRead``); both send
through psycopg's pipeline mode (``kernel.pipelined``) and wait later, inside the
same transaction. Agents and websockets are told after commit.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction

from kernel import counters, pgarrays
from kernel.pipelined import Pipelined
from nodes.models import GPUHealth, NodeStatus, model_cache
from scheduling import arrays, dependencies, lifecycle, task_fields, triggers
from scheduling.choices import ACTIVE_STATUSES, TaskStatus
from scheduling.lock import LOCK_IN_BATCH_SQL, lock_in_batch_params, lock_scheduler
from scheduling.models import Task
from scheduling.placement import (
    ColumnCache,
    GpuState,
    NodeState,
    PendingInfo,
    PendingTask,
    Placement,
    Plan,
    RunningTask,
    Snapshot,
    TenantState,
)
from scheduling.placement import schedule as core_schedule
from scheduling.reservations import WINDOWS_SQL, windows_from_rows
from tenants.models import Limits, Quota, QuotaGrant, effective_limits

log = logging.getLogger(__name__)

Schedule = Callable[[Snapshot], Plan]

# Limits of a tenant that has no Quota row: the model's defaults.
_DEFAULT_QUOTA = {f: Quota._meta.get_field(f).default for f in ("max_gpus", "max_gpu_memory_mb", "max_running_tasks")}


@dataclass
class PassResult:
    placements: int = 0
    preemptions: int = 0
    pending: int = 0
    duration_s: float = 0.0
    core_s: float = 0.0
    # Placements dropped because their task left the queue (e.g. cancelled) during the pass.
    skipped: int = 0
    # Seconds spent after commit telling agents and websockets (kernel.live pushes).
    notify_s: float = 0.0
    placed_task_ids: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"placed {self.placements}, preempted {self.preemptions}, pending {self.pending}, "
                f"{self.duration_s * 1000:.1f} ms (core {self.core_s * 1000:.1f} ms)")


def holder_name(actor: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{actor}"[:200]


# --- loading -------------------------------------------------------------------------

_NODES_SQL = "SELECT id, name, labels, status FROM nodes_node ORDER BY id"

# The GPUs with their active allocations aggregated, in two steps: every server's GPU rows as
# one text (its key: each GPU's id, row version and allocations, in index order), then the full
# columns of only the servers whose key the previous load did not see (or with GPUs holding
# models, whose cache ages with the clock). Parsing 17 columns of every GPU cost a lone task's
# pass more than the rest of its reads together, and a row per GPU then still cost more than
# the pass's decision.
_GPU_JOIN = """
FROM nodes_gpu g
LEFT JOIN (
    SELECT gpu_id, sum(memory_mb) AS claimed, bool_or(exclusive) AS exclusive,
           count(*) FILTER (WHERE NOT exclusive) AS shared
    FROM scheduling_allocation WHERE released_at IS NULL GROUP BY gpu_id
) a ON a.gpu_id = g.id
"""
# A GPU row's version is its (xmin, cmin): every UPDATE writes a new row version, stamped with
# its transaction and, within that transaction, its command, so no two versions of one row share
# both (and freezing keeps the raw xmin the column shows). It costs half of spelling out the
# columns' text (8,000 GPUs: 21 ms against 42 ms). The allocations' aggregate is not in the row:
# it is spelled out (all three NULL or none, so concat_ws's skipping of NULLs is unambiguous).
_GPU_KEY = "concat_ws(',', g.xmin, g.cmin, a.claimed, a.exclusive, a.shared)"

# A GPU's part of its server's key; _GpuRead joins them the same way to key what it reads.
_GPU_KEY_PART = f"g.id::text || '/' || {_GPU_KEY}"
_KEY_SEPARATOR = ";"

_GPU_KEYS_SQL = f"""
SELECT g.node_id, string_agg({_GPU_KEY_PART}, '{_KEY_SEPARATOR}' ORDER BY g.index),
       bool_or(g.loaded_models <> '{{}}'::jsonb)
{_GPU_JOIN}
GROUP BY g.node_id
"""

_GPUS_SQL = f"""
SELECT g.id, g.node_id, g.index, g.uuid, g.model_name, g.memory_total_mb, g.memory_used_mb,
       g.utilization_pct, g.temperature_c, date_part('epoch', g.idle_since), g.loaded_models, g.cordoned,
       g.reserved, g.health,
       coalesce(a.claimed, 0), coalesce(a.exclusive, false), coalesce(a.shared, 0), {_GPU_KEY_PART}
{_GPU_JOIN}
WHERE g.node_id = ANY(%s::bigint[])
ORDER BY g.node_id, g.index
"""

# (idle_since comes as epoch seconds: parsing 8,000 timestamps from text costs more than the query.
# So do the tasks' times below. A double holds a timestamp to well under a microsecond, and
# fromtimestamp rounds to the nearest one: the exact stored value comes back.)

# Tasks holding GPUs (assigned or running) with their active allocations. LEFT JOIN:
# an active task without allocations still counts against its tenant's running limit.
_HOLDING_SQL = f"""
SELECT t.id, t.tenant_id, t.priority, t.workload_class,
       date_part('epoch', coalesce(t.started_at, t.assigned_at, t.created_at)),
       t.timeout_s, min(a.node_id), array_remove(array_agg(a.gpu_id ORDER BY a.gpu_id), NULL),
       coalesce(max(a.memory_mb), 0), coalesce(bool_and(a.exclusive), true), coalesce(sum(a.memory_mb), 0)
FROM scheduling_task t
LEFT JOIN scheduling_allocation a ON a.task_id = t.id AND a.released_at IS NULL
WHERE t.status IN ('{TaskStatus.ASSIGNED}', '{TaskStatus.RUNNING}')
GROUP BY t.id
"""  # noqa: S608

# The fair-share factor is refreshed once a minute by scheduling.usage, not computed here.
_TENANTS_SQL = """
SELECT t.id, t.slug, q.max_gpus, q.max_gpu_memory_mb, q.max_running_tasks, coalesce(f.factor, 1.0)
FROM tenants_tenant t LEFT JOIN tenants_quota q ON q.tenant_id = t.id
LEFT JOIN tenants_fairshare f ON f.tenant_id = t.id
"""

# The queue in its index order (task_pending_queue_idx). A task that names a model but
# no memory asks for the model's remembered estimate (raised x1.2 after each OOM): a
# subquery, not a join, so that nothing stands between the index and the order it gives.
# The task's own columns come from its field table (scheduling.task_fields.PENDING).
_PENDING_SQL = f"""
SELECT t.id, date_part('epoch', t.created_at), t.pending_reason, t.queue_position,
       {task_fields.pending_columns()}
FROM scheduling_task t
WHERE t.status = '{TaskStatus.PENDING}'
ORDER BY t.priority DESC, t.created_at, t.id
"""  # noqa: S608 - column names from the field table, no input

# Sorting off for the queue's read alone (transaction-local, like the nested loops). Where
# nearly every task is pending (a fresh backlog) the planner prefers a scan and a sort to the
# partial index, which already holds the queue in its order: 2,000 pending tasks read in
# 8.4 ms through the index against 13.6 ms scanned and sorted (30 reads each, alternating).
# Where finished tasks outnumber the queue, as they soon do, it picks the index anyway.
_SORT_OFF = "SELECT set_config('enable_sort', 'off', true)"
_SORT_ON = "SELECT set_config('enable_sort', 'on', true)"


def _json(raw: str | dict | None) -> dict:
    # Django's psycopg setup hands jsonb over as text (it decodes JSON itself).
    if raw is None or raw == "{}":
        return {}
    value = json.loads(raw) if isinstance(raw, str) else raw
    return value if isinstance(value, dict) else {}


def _loaded_models(raw: str | dict | None, now: datetime, ttl_s: int) -> dict[str, datetime]:
    if raw is None or raw == "{}":
        return {}
    return model_cache(_json(raw), now=now, ttl_s=ttl_s)


def _reserved(config_reserved: tuple[str, ...], node_names: dict[int, str], gpu_node: int, index: int,
              uuid: str) -> bool:
    return uuid in config_reserved or f"{node_names.get(gpu_node)}:{index}" in config_reserved


@dataclass
class _Loaded:
    snapshot: Snapshot
    # task id -> (pending_reason, queue_position) as stored, to write only what changed
    stored_pending: dict[int, tuple[str, int | None]]
    tenant_of: dict[int, int]
    # GPUs without allocations whose idle clock never started (the idle_since column is NULL).
    never_idle: list[int]
    node_names: dict[int, str]
    nodes: dict[int, NodeState]
    # The rows of dependencies.PENDING_DEPENDENCIES_SQL and arrays.THROTTLED_SQL (read in the batch).
    dependency_rows: list[tuple]
    throttle_rows: list[tuple]

    # server id -> {GPU id: its index}, made for a server at its first placement in this load
    # (rebuilt per placement it cost a tenth of a pass placing hundreds of tasks; made for every
    # server up front it would cost a lone task's pass the whole cluster).
    _gpu_index: dict[int, dict[int, int]] = field(default_factory=dict, init=False, repr=False)

    def _gpu_indexes(self, node_id: int, gpu_ids: tuple[int, ...]) -> str:
        index = self._gpu_index.get(node_id)
        if index is None:
            node = self.nodes.get(node_id)
            index = self._gpu_index[node_id] = {g.id: g.index for g in node.gpus} if node is not None else {}
        return ",".join(str(index.get(g, "?")) for g in gpu_ids)

    def placement_reason(self, placement: Placement) -> str:
        mode = "exclusive" if placement.exclusive else "shared"
        if placement.ranks:
            where = "; ".join(
                f"rank {r} on {self.node_names.get(n, n)}, GPU {self._gpu_indexes(n, gids)}"
                for r, (n, gids) in enumerate(placement.ranks))
            return f"placed as a gang: {where} ({placement.memory_mb} MB each, {mode})"[:500]
        indexes = self._gpu_indexes(placement.node_id, placement.gpu_ids)
        node = self.node_names.get(placement.node_id, placement.node_id)
        return f"placed on {node}, GPU {indexes} ({placement.memory_mb} MB each, {mode})"[:500]


# The previous load's GPU objects by their server's key (its GPU rows' versions): unchanged rows
# give the same GpuStates, so a pass builds objects only for the servers whose GPUs heartbeats
# or allocations changed since (a lone task's pass on a quiet cluster was otherwise mostly
# this). Sound because a GpuState is a function of its row alone (and of the configured
# reserved GPUs and its server's name, then all read afresh), except for its model cache, which
# ages with the clock: servers with GPUs holding models are always read afresh. No two versions
# of a row share (xmin, cmin), within a transaction or across: the command id keeps counting
# through rolled-back savepoints, a savepoint's writes get their own xid, and an aborted xid is
# never reused. So a transaction that reads its own uncommitted changes (what-if, tests) cannot
# leave a stale object behind either. The placement core copies what it changes and never writes
# to a GpuState. Values: (the server's GpuStates in index order, its GPUs without allocations
# whose idle_since column is NULL).
_gpu_states: dict[str, tuple[tuple[GpuState, ...], tuple[int, ...]]] = {}

# Each server's working columns as the placement core built them from these GpuStates
# (Snapshot.columns): a server whose GPUs are all unchanged objects is not rebuilt. Sound for
# the same reason as above: this module never changes a GpuState it handed to the core.
_columns = ColumnCache()


# Transaction-local (like SET LOCAL), so nothing leaks past the pass's transaction.
_NESTLOOP_OFF = "SELECT set_config('enable_nestloop', 'off', true)"
_NESTLOOP_ON = "SELECT set_config('enable_nestloop', 'on', true)"


def _next_result(cursor) -> None:
    if not cursor.nextset():  # pragma: no cover - needs a server-side-binding cursor, which we never configure
        raise RuntimeError("the snapshot reads need a client-side cursor (multiple statements per query)")


def load_snapshot(now: datetime | None, *, lock_holder: str | None = None) -> _Loaded:
    """The snapshot at ``now``. With ``lock_holder`` (and ``now`` None), take the scheduler lock
    first, in the same round trip (``scheduling.lock.LOCK_IN_BATCH_SQL``): the snapshot's
    ``now`` is then the lock's database time, as ``lock_scheduler`` returns it."""
    config = settings.SCHEDULER
    reserved = tuple(config.reserved_gpus)
    reads = (_NESTLOOP_OFF, _NODES_SQL, _GPU_KEYS_SQL, _TENANTS_SQL, _HOLDING_SQL, _SORT_OFF, _PENDING_SQL, _SORT_ON,
             _GRANTS_SQL, _NESTLOOP_ON, WINDOWS_SQL, dependencies.PENDING_DEPENDENCIES_SQL, arrays.THROTTLED_SQL)
    params: dict = {"now": now}
    if lock_holder is not None:
        reads = (LOCK_IN_BATCH_SQL, *reads)
        params.update(lock_in_batch_params(lock_holder))
    with connection.cursor() as cursor:
        # One round trip for the nine reads (a client-side cursor sends them as one simple
        # query; they all run in the pass's transaction, after the lock). Nested loops are
        # off for them alone: each read is a bulk scan, and right after a burst of placements
        # the planner's statistics still say the allocation table is nearly empty, so it
        # picked nested loops that went quadratic (8,000 GPUs: 3 s instead of 0.1 s). Sorting
        # is off for the queue's read alone (_SORT_OFF).
        # The reservations' windows, the dependencies and the arrays' throttles come in the same
        # round trip, after nested loops are back on (they join a few rows to the task table by
        # its key, which a hash join would scan whole).
        cursor.execute(";\n".join(reads), params)
        if lock_holder is not None:
            locked = cursor.fetchone()
            if locked is None:
                # No lock row (a table flush): nothing was locked, so these reads are void.
                _lock_id, now = lock_scheduler(holder=lock_holder)
                return load_snapshot(now)
            now = locked[1]
            _next_result(cursor)
        cursor.fetchall()
        _next_result(cursor)
        nodes: dict[int, NodeState] = {}
        node_names: dict[int, str] = {}
        for node_id, name, labels, status in cursor.fetchall():
            nodes[node_id] = NodeState(id=node_id, name=name, labels=_json(labels),
                                       schedulable=status == NodeStatus.ACTIVE, gpus=[])
            node_names[node_id] = name

        _next_result(cursor)
        # The GPU rows the previous load's objects do not cover: sent now, read by PostgreSQL
        # while this parses the rest of the batch (kernel.pipelined).
        gpu_read = _GpuRead(cursor.fetchall(), reserved)

        try:
            _next_result(cursor)
            tenants: dict[int, TenantState] = {}
            for tenant_id, slug, max_gpus, max_mem, max_running, fair_share in cursor.fetchall():
                tenants[tenant_id] = TenantState(
                    id=tenant_id, slug=slug,
                    max_gpus=_DEFAULT_QUOTA["max_gpus"] if max_gpus is None else max_gpus,
                    max_gpu_memory_mb=_DEFAULT_QUOTA["max_gpu_memory_mb"] if max_mem is None else max_mem,
                    max_running_tasks=_DEFAULT_QUOTA["max_running_tasks"] if max_running is None else max_running,
                    used_gpus=0, used_gpu_memory_mb=0, running_tasks=0, fair_share=fair_share,
                )

            _next_result(cursor)
            running: list[RunningTask] = []
            # Tenant usage counts distinct GPUs, like scheduling.quotas.usage_of.
            tenant_gpus: dict[int, set[int]] = {}
            for (task_id, tenant_id, priority, wclass, since, timeout_s, node_id, gpu_ids, mem, exclusive,
                 mem_total) in cursor.fetchall():
                tenant = tenants.get(tenant_id)
                if tenant is not None:
                    tenant.running_tasks += 1
                    tenant.used_gpu_memory_mb += int(mem_total)
                    tenant_gpus.setdefault(tenant_id, set()).update(gpu_ids)
                if node_id is None:
                    continue
                running.append(RunningTask(
                    id=task_id, tenant_id=tenant_id, priority=priority, workload_class=wclass, node_id=node_id,
                    gpu_ids=tuple(gpu_ids), memory_mb=mem, exclusive=exclusive,
                    expected_end=datetime.fromtimestamp(since, UTC) + timedelta(seconds=timeout_s),
                ))
            for tenant_id, gpus in tenant_gpus.items():
                tenants[tenant_id].used_gpus = len(gpus)

            _next_result(cursor)  # sorting off (the queue's read)
            _next_result(cursor)
            pending: list[PendingTask] = []
            stored: dict[int, tuple[str, int | None]] = {}
            tenant_of: dict[int, int] = {}
            for task_id, created_at, reason, position, *columns in cursor.fetchall():
                task = task_fields.pending_task(task_id, datetime.fromtimestamp(created_at, UTC), columns)
                pending.append(task)
                stored[task_id] = (reason, position)
                tenant_of[task_id] = task.tenant_id

            _next_result(cursor)  # sorting back on
            _next_result(cursor)
            _add_quota_grants(cursor.fetchall(), tenants, now)
            _next_result(cursor)  # nested loops back on (the GPUs' read sets them off for itself)
            _next_result(cursor)
            windows = windows_from_rows(cursor.fetchall())
            _next_result(cursor)
            dependency_rows = cursor.fetchall()
            _next_result(cursor)
            throttle_rows = cursor.fetchall()
        finally:
            gpu_read.wait()  # always: it ends the pipeline
        never_idle = gpu_read.build(nodes, node_names, now, config.model_cache_ttl_seconds)

    snapshot = Snapshot(now=now, config=config, nodes=list(nodes.values()), tenants=tenants, running=running,
                        pending=pending, reservations=windows, columns=_columns)
    return _Loaded(snapshot, stored, tenant_of, never_idle, node_names, nodes, dependency_rows, throttle_rows)


class _GpuRead:
    """Every GPU on its node (in index order), reusing the previous load's objects for servers
    whose rows did not change and reading the rest. With reserved GPUs in the configuration
    (matched by server name) every GPU is read afresh.

    The read is sent as soon as the keys are known (``kernel.pipelined``) and PostgreSQL runs
    it while the snapshot's other rows are parsed: ``wait()`` then collects its rows."""

    def __init__(self, gpu_keys: list[tuple], reserved: tuple[str, ...]) -> None:
        self.reserved = reserved
        self.rows: list[tuple] = []
        cache = {} if reserved else _gpu_states
        self.kept: dict[str, tuple[tuple[GpuState, ...], tuple[int, ...]]] = {}
        self.found: dict[int, tuple[tuple[GpuState, ...], tuple[int, ...]]] = {}
        missing: list[int] = []
        for node_id, node_key, has_models in gpu_keys:
            hit = None if has_models else cache.get(node_key)
            if hit is None:
                missing.append(node_id)
            else:
                self.found[node_id] = self.kept[node_key] = hit
        self._pipelined: Pipelined | None = None
        if missing:
            # Nested loops off here too (see load_snapshot): right after a burst of placements
            # the planner still thinks the allocation table is nearly empty.
            self._pipelined = Pipelined()
            self._pipelined.send(_NESTLOOP_OFF)
            self._cursor = self._pipelined.send(_GPUS_SQL, [pgarrays.ints(missing)])
            self._pipelined.send(_NESTLOOP_ON)

    def wait(self) -> None:
        pipelined, self._pipelined = self._pipelined, None
        if pipelined is not None:
            self.rows, = pipelined.fetchall(self._cursor)

    def build(self, nodes: dict[int, NodeState], node_names: dict[int, str], now: datetime, ttl_s: int) -> list[int]:
        """Put the GPUs on their nodes; returns those without allocations whose idle clock is unset."""
        global _gpu_states
        found, kept, reserved = self.found, self.kept, self.reserved
        by_node: dict[int, list[tuple]] = {}
        for row in self.rows:
            by_node.setdefault(row[1], []).append(row)
        for node_id, node_rows in by_node.items():
            gpus: list[GpuState] = []
            unset: list[int] = []
            models = False
            for (gpu_id, _node, index, uuid, model, total, used, util, temp, idle_since, loaded, cordoned,
                 flagged_reserved, health, claimed, exclusive, shared, _key) in node_rows:
                # By position, in GpuState's order (1,600 GPUs: a third quicker than by keyword).
                gpus.append(GpuState(
                    gpu_id, node_id, index, uuid, model, total, used, int(claimed), bool(exclusive), int(shared),
                    util, temp,
                    # idle_since: a GPU holding allocations is busy whatever the column still says.
                    (datetime.fromtimestamp(idle_since, UTC)
                     if idle_since is not None and not (exclusive or shared) else None),
                    _loaded_models(loaded, now, ttl_s),
                    not (cordoned or flagged_reserved or health == GPUHealth.ERROR
                         or (reserved and _reserved(reserved, node_names, node_id, index, uuid))),
                ))
                if idle_since is None and not (exclusive or shared):
                    unset.append(gpu_id)
                models = models or not (loaded is None or loaded == "{}")
            found[node_id] = entry = (tuple(gpus), tuple(unset))
            if not reserved and not models:
                # Keyed by the rows as this read saw them, joined as _GPU_KEYS_SQL joins them.
                kept[_KEY_SEPARATOR.join(row[-1] for row in node_rows)] = entry
        never_idle: list[int] = []
        for node_id, entry in found.items():
            node = nodes.get(node_id)
            if node is None:  # pragma: no cover - a server changed between the reads
                continue
            node.gpus = list(entry[0])
            never_idle.extend(entry[1])
        _gpu_states = kept
        return never_idle


# The pass's clock in its reads: the ``now`` given, else (the lock leads the batch) the lock's
# acquired_at, statement_timestamp(), which is the same for every statement of one batch.
_NOW = "coalesce(%(now)s::timestamptz, statement_timestamp())"

# Approved grants whose window holds ``now`` (the pass's clock, not the database's):
# the scheduler's limits are base + these (tenants.models.effective_limits).
_GRANTS_SQL = f"""
SELECT tenant_id, extra_gpus, extra_gpu_memory_mb, extra_running_tasks, starts_at, ends_at, state
FROM tenants_quotagrant
WHERE state = '{QuotaGrant.State.APPROVED}' AND starts_at <= {_NOW} AND ends_at > {_NOW}
"""  # noqa: S608


def _add_quota_grants(rows: list[tuple], tenants: dict[int, TenantState], now: datetime) -> None:
    by_tenant: dict[int, list[QuotaGrant]] = {}
    for tenant_id, gpus, mem, running, starts, ends, state in rows:
        by_tenant.setdefault(tenant_id, []).append(QuotaGrant(
            tenant_id=tenant_id, extra_gpus=gpus, extra_gpu_memory_mb=mem, extra_running_tasks=running,
            starts_at=starts, ends_at=ends, state=state))
    for tenant_id, grants in by_tenant.items():
        tenant = tenants.get(tenant_id)
        if tenant is None:
            continue
        limits = effective_limits(Limits(tenant.max_gpus, tenant.max_gpu_memory_mb, tenant.max_running_tasks),
                                  grants, now)
        tenant.max_gpus = limits.max_gpus
        tenant.max_gpu_memory_mb = limits.max_gpu_memory_mb
        tenant.max_running_tasks = limits.max_running_tasks


# --- applying -------------------------------------------------------------------------

_UPDATE_PENDING_SQL = """
UPDATE scheduling_task t
SET pending_reason = v.reason, queue_position = v.position
FROM unnest(%s::bigint[], %s::text[], %s::integer[]) AS v(id, reason, position)
WHERE t.id = v.id AND t.status = %s
"""


# GPU rows are also written by agent heartbeats: never wait for (or deadlock with) one.
# A GPU skipped here gets its idle clock right in a later pass; it only feeds a score.
_SET_IDLE_SINCE_SQL = """
UPDATE nodes_gpu SET idle_since = %s
WHERE id IN (SELECT id FROM nodes_gpu WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE SKIP LOCKED)
"""


def _apply_preemptions(plan: Plan, actor: str, fan: lifecycle.FanOut) -> int:
    if not plan.preemptions:
        return 0
    by_victim = {p.task_id: p for p in plan.preemptions}
    done = 0
    victims = (Task.objects.select_for_update(of=("self",))
               .filter(pk__in=list(by_victim), status__in=ACTIVE_STATUSES)
               .order_by("pk"))
    for victim in victims:
        preemption = by_victim[victim.pk]
        reason = preemption.reason or f"preempted by task {preemption.by_task_id}"
        lifecycle.requeue(victim, actor=actor, reason=reason, fan=fan, move=lifecycle.Move.PREEMPT)
        done += 1
    return done


def _placing(loaded: _Loaded, p: Placement) -> lifecycle.Placing:
    ranks = p.ranks or ((p.node_id, p.gpu_ids),)
    return lifecycle.Placing(
        task_id=p.task_id, tenant_id=loaded.tenant_of[p.task_id], node_id=p.node_id,
        reason=loaded.placement_reason(p), memory_mb=p.memory_mb, exclusive=p.exclusive,
        gpus=tuple((gpu_id, node_id) for node_id, gpu_ids in ranks for gpu_id in gpu_ids),
        ranks=tuple(node_id for node_id, _gpus in p.ranks))


# Placements per batch written while the core decides: 150 and 300 measured alike (a pass
# from empty at 1,600 GPUs, 807 placements: median 78.4 and 79.0 ms against 86-89 ms).
STREAM_BATCH = 200
# The first batch is sent sooner: PostgreSQL has nothing to do until it comes (the same pass,
# first batch of 50 against 200: median 69.9 against 72.5 ms, 20 passes each, alternating).
STREAM_FIRST_BATCH = 50


class _Streamer:
    """The core's ``on_place``: collects the placements it reports into batches for a
    ``lifecycle.PlacementStream``. A task the pass will skip (not in the snapshot's queue as
    stored) is left to ``_apply``."""

    def __init__(self, loaded: _Loaded, stream: lifecycle.PlacementStream) -> None:
        self.loaded = loaded
        self.stream = stream
        self.batch: list[Placement] = []
        self.size = STREAM_FIRST_BATCH

    def __call__(self, placement: Placement) -> None:
        if placement.task_id not in self.loaded.stored_pending:
            return
        self.batch.append(placement)
        if len(self.batch) >= self.size:
            self.flush()

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        self.size = STREAM_BATCH
        self.stream.send([_placing(self.loaded, p) for p in batch])


def _apply(loaded: _Loaded, plan: Plan, *, actor: str, now: datetime, result: PassResult,
           fan: lifecycle.FanOut, written: lifecycle.PlacementStream) -> None:
    result.preemptions = _apply_preemptions(plan, actor, fan)
    if result.preemptions:
        # Victims are pending again and may fit elsewhere now.
        fan.wake_as("tasks preempted")

    placements = [p for p in plan.placements if p.task_id in loaded.stored_pending]
    result.skipped = len(plan.placements) - len(placements)
    by_id = {p.task_id: p for p in placements}
    # Those the stream wrote while the core decided are taken (or not) already.
    sent = {p.task_id for p in written.sent}
    taken = written.taken + lifecycle.place_many(
        [_placing(loaded, p) for p in placements if p.task_id not in sent], actor=actor, now=now, fan=fan)
    result.skipped += len(placements) - len(taken)
    placements = [by_id[p.task_id] for p in taken]
    result.placed_task_ids = [p.task_id for p in placements]
    result.placements = len(placements)

    # A GPU never seen idle starts its idle clock here, once; afterwards releasing a GPU's
    # last allocation restarts it (Task.release_allocations), and the snapshot shows busy
    # GPUs as not idle, so placing never has to write GPU rows.
    placed_gpus = {g for p in placements for g in p.gpu_ids}
    never_idle = [g for g in loaded.never_idle if g not in placed_gpus]
    if never_idle:
        with connection.cursor() as cursor:
            cursor.execute(_SET_IDLE_SINCE_SQL, [now, pgarrays.ints(never_idle)])
    result.pending = len(plan.pending)


def _pending_changes(loaded: _Loaded, plan: Plan, fan: lifecycle.FanOut) -> list | None:
    """``_UPDATE_PENDING_SQL``'s parameters for the waiting tasks whose reason or position
    changed (None where none did); their pages are told of a new reason."""
    placed = {p.task_id for p in plan.placements}
    u_id, u_reason, u_pos = [], [], []
    for task_id, info in plan.pending.items():
        stored = loaded.stored_pending.get(task_id)
        if stored is None or task_id in placed:
            continue
        # Waiting will not help such a task: say so first, or users read it as "in the queue".
        reason = (f"can never fit on the active servers: {info.reason}" if info.never_fits else info.reason)[:500]
        if stored != (reason, info.position):
            u_id.append(task_id)
            u_reason.append(reason)
            u_pos.append(info.position)
            if stored[0] != reason:
                fan.task_changed(loaded.tenant_of[task_id], task_id)
    if not u_id:
        return None
    return [pgarrays.ints(u_id), pgarrays.texts(u_reason), pgarrays.ints(u_pos), TaskStatus.PENDING]


def _default_schedule() -> Schedule:
    return core_schedule


def run_pass(actor: str = "scheduler", *, schedule: Schedule | None = None, clear_request: bool = True) -> PassResult:
    """Run one pass in its own transaction and return what it did.

    ``schedule`` defaults to ``scheduling.placement.schedule``; tests hand in others.
    """
    started = time.perf_counter()
    decide = schedule or _default_schedule()
    # The placement core reports its placements as it decides them, and the pass writes them
    # meanwhile (_Streamer); any other schedule (tests hand some in) gets the snapshot alone.
    stream = decide is core_schedule
    if clear_request:
        # Before the lock, in its own statement: a request made after this point flips
        # the flag again and gets its own pass; one made before it is in our snapshot.
        triggers.clear_request()
    result = PassResult()
    committed: list[float] = []
    try:
        with _collector_paused(), _own_statements():
            _run_pass_transaction(decide, actor, result, committed, stream=stream)
    except Exception:
        _record_pass(time.perf_counter() - started, ok=False)
        raise
    ended = time.perf_counter()
    # Inside an outer transaction (tests) nothing has committed yet: count it all.
    done = committed[0] if committed else ended
    result.duration_s = done - started
    result.notify_s = ended - done
    _record_pass(result.duration_s, ok=True)
    return result


@contextmanager
def _own_statements() -> Iterator[None]:
    """The pass's statements as it wrote them, without the connection's execute wrappers.

    The audit's wrapper (pghistory's context: an audited request with a synchronous django-q
    cluster, ``manage.py shell``) prefixes each write with a statement of its own and leaves
    the cursor at the last result, so the snapshot's batch of reads came back out of step
    ("the snapshot reads need a client-side cursor"). The pass's changes are the scheduler's,
    recorded under its own actor in their events, not under its caller's context.
    """
    wrappers = connection.execute_wrappers
    connection.execute_wrappers = []
    try:
        yield
    finally:
        connection.execute_wrappers = wrappers


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the pass holds the scheduler lock.

    A pass from empty makes tens of thousands of objects (the snapshot, the plan) that live
    until it ends: counted as survivors, they set off collections of the whole process heap in
    the middle of the pass (a full one of ~100 ms about one pass in three at 1,600 GPUs, and
    ~10 ms of younger ones in every pass), all while every other pass, sweep and reservation
    change waits for the lock. With the collector off they are freed by reference counting
    when the pass returns, so they never reach the older generations at all; whatever garbage
    has cycles is collected after the pass. Left alone when something else turned it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _record_pass(duration_s: float, *, ok: bool) -> None:
    """Feed /metrics (pass count, duration histogram, failures); never fails the pass."""
    try:
        counters.record_pass(duration_s, ok=ok)
    except Exception:
        log.exception("could not record pass metrics")


def _run_pass_transaction(decide, actor: str, result: PassResult, committed: list[float], *, stream: bool) -> None:
    with transaction.atomic():
        # First of the after-commit hooks: marks the commit, before the pushes to agents
        # and websockets run (they are not part of the pass's duration; see notify_s).
        transaction.on_commit(lambda: committed.append(time.perf_counter()))
        # The lock and the snapshot's reads in one round trip.
        loaded = load_snapshot(None, lock_holder=holder_name(actor))
        now = loaded.snapshot.now
        # One fan-out for the whole pass: agents, pages and the next wake-up are told once.
        with lifecycle.batch() as fan:
            held = _hold_dependents(loaded, actor, fan)
            written = lifecycle.PlacementStream(actor=actor, now=now, fan=fan)
            streamer = _Streamer(loaded, written) if stream else None
            core_started = time.perf_counter()
            try:
                plan = decide(loaded.snapshot, on_place=streamer) if streamer else decide(loaded.snapshot)
                result.core_s = time.perf_counter() - core_started
                if streamer:
                    streamer.flush()
                position = len(plan.pending)
                for task_id, reason in held.items():
                    position += 1
                    plan.pending[task_id] = PendingInfo(reason=reason, position=position)
                # The waiting tasks' reasons and positions follow the last batch: worked out
                # while PostgreSQL still writes the placements, and waited for with them.
                changes = _pending_changes(loaded, plan, fan)
                if changes:
                    written.run_after(_UPDATE_PENDING_SQL, changes)
            finally:
                written.close()  # waits for what was sent (nothing, unless streaming)
            _apply(loaded, plan, actor=actor, now=now, result=result, fan=fan, written=written)


def _hold_dependents(loaded: _Loaded, actor: str, fan: lifecycle.FanOut) -> dict[int, str]:
    """Take tasks waiting for their dependencies, or beyond their array's throttle, out of the
    core's queue (they are listed after it, with their reason); cancel those whose dependencies
    can never be satisfied."""
    waiting, never = dependencies.blocked_from_rows(loaded.dependency_rows)
    for task_id, reason in arrays.throttled_from_rows(loaded.throttle_rows).items():
        waiting.setdefault(task_id, reason)
    if not (waiting or never):
        return {}
    if settings.SCHEDULER.cancel_invalid_dependents:
        for task_id, reason in never.items():
            lifecycle.cancel(task_id, actor=actor, reason=reason, fan=fan)
            loaded.stored_pending.pop(task_id, None)
        if never:
            # Their own dependents may now be unsatisfiable in turn.
            fan.request_pass("dependents cancelled")
    else:
        waiting.update(never)
    held = waiting.keys() | never.keys()
    loaded.snapshot.pending = [t for t in loaded.snapshot.pending if t.id not in held]
    return waiting


def run_requested_pass(reason: str = "") -> str:
    """The django-q task enqueued by ``triggers.request_pass``. Skips the pass when
    another pass has started since the request (it cleared the flag and its snapshot
    covers the request)."""
    if not triggers.clear_request():
        return "skipped: a pass already ran since the request"
    result = run_pass(actor="scheduler:q", clear_request=False)
    log.info("q pass (%s): %s", reason, result)
    return str(result)
