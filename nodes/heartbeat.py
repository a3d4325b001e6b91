"""Heartbeat ingestion: one agent report becomes two statements in the usual case.

The GPUs are read, then the server's row and every GPU's metrics are written by
one statement (its own transaction); a report that adds GPUs or cordons one takes
the longer path, in one transaction. GPU rows are updated set-based (created on first
report), the server's ``last_heartbeat_at`` is the *database* clock (agent
clocks may be wrong), and a GPU that reports new uncorrected ECC errors or a
critical Xid error is cordoned with the reason and raises an Alert. The
inventory is checked against what the portal knows: a GPU the agent stops
reporting, or whose UUID changes at its index, is cordoned at once with the
reason and an Alert (never silently given to a task or accepted). Pushes and the
scheduler wake-up go out after commit.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, connection, transaction

from kernel import events, hearing, live
from kernel.alerts import raise_alert
from kernel.models import Alert
from kernel.prepared import prepared_cursor
from nodes.models import GPU, GPUHealth, Node, NodeStatus, remember_models

# One UPDATE for all of a server's GPUs. (``bulk_update`` builds a CASE expression per
# field and row: about 15 ms of CPU for 8 GPUs, which alone would cap a web process
# near 60 heartbeats/s; this statement costs well under a millisecond to build.) The rows
# travel as one JSON document: the driver quoting eleven arrays element by element was a
# tenth of a heartbeat's CPU, and ``json.dumps`` is C.
_METRIC_COLUMNS = ("pk", "uuid", "model_name", "memory_total_mb", "memory_used_mb", "utilization_pct",
                   "temperature_c", "power_w", "ecc_errors", "retired_pages", "health")
_UPDATE_METRICS = f"""
UPDATE nodes_gpu AS g SET
    uuid = v.uuid, model_name = v.model_name, memory_total_mb = v.memory_total_mb,
    memory_used_mb = v.memory_used_mb, utilization_pct = v.utilization_pct, temperature_c = v.temperature_c,
    power_w = v.power_w, ecc_errors = v.ecc_errors, retired_pages = v.retired_pages,
    -- An error stays until an operator uncordons the GPU (GPU.uncordon), read from the row as
    -- it is now: a report that found no new error never brings it back, and one that read the
    -- row before an uncordon does not undo it.
    health = CASE WHEN g.health = '{GPUHealth.ERROR}' THEN g.health ELSE v.health END,
    updated_at = now()
FROM jsonb_to_recordset(%s::jsonb)
    AS v(pk bigint, uuid varchar, model_name varchar, memory_total_mb int, memory_used_mb int, utilization_pct int,
         temperature_c int, power_w int, ecc_errors bigint, retired_pages int, health varchar)
WHERE g.id = v.pk
"""  # noqa: S608 - constants


def _metric_rows(gpus: list[GPU]) -> str:
    return json.dumps([{column: getattr(gpu, column) for column in _METRIC_COLUMNS} for gpu in gpus])


# Heartbeat time is the database's clock; the old status tells whether the server came back.
# FOR NO KEY UPDATE, as the UPDATE itself locks: it conflicts with the sweep's FOR UPDATE and
# with other writers of the row, but not with the FOR KEY SHARE that a transaction referencing
# the server holds to its commit (a pass placing a task there, an agent's report), which each
# heartbeat waited for under FOR UPDATE, and which waited for each heartbeat.
_TOUCH_NODE = f"""
UPDATE nodes_node AS n SET
    last_heartbeat_at = statement_timestamp(), updated_at = statement_timestamp(),
    agent_version = COALESCE(NULLIF(%s, ''), n.agent_version),
    hostname = COALESCE(NULLIF(%s, ''), n.hostname),
    status = CASE WHEN o.status = '{NodeStatus.OFFLINE}' THEN n.intent ELSE n.status END,
    status_reason = CASE WHEN o.status = '{NodeStatus.OFFLINE}' THEN 'heartbeat received' ELSE n.status_reason END
FROM (SELECT id, status FROM nodes_node WHERE id = %s FOR NO KEY UPDATE) AS o
WHERE n.id = o.id
RETURNING o.status
"""  # noqa: S608

# Both in one statement (each a data-modifying CTE): the usual heartbeat's one round trip.
_TOUCH_AND_UPDATE_METRICS = (
    f"WITH touched AS ({_TOUCH_NODE}), metrics AS ({_UPDATE_METRICS}) SELECT status FROM touched"  # noqa: S608
)

# Live GPU views are refreshed at most once a second per web process, for all the
# servers heard from meanwhile: 1,000 servers must not mean 200 pushes a second.
# A server joining, a new GPU or a cordon is pushed at once. A server heard from
# during the quiet second is pushed at its end (a timer), never left waiting for
# the next heartbeat; ids join the pending set only after their commit.
PUSH_EVERY_S = 1.0
_push_lock = threading.Lock()
_push_pending: set[int] = set()
_push_last = 0.0
_push_timer: threading.Timer | None = None


def _gpus_changed(node_id: int, *, urgent: bool) -> None:
    transaction.on_commit(lambda: _queue_push(node_id, urgent=urgent))


def _queue_push(node_id: int, *, urgent: bool) -> None:
    global _push_timer
    with _push_lock:
        _push_pending.add(node_id)
        wait = PUSH_EVERY_S - (time.monotonic() - _push_last)
        if not urgent and wait > 0:
            if _push_timer is None:
                _push_timer = threading.Timer(wait, _flush_pushes)
                _push_timer.daemon = True
                _push_timer.start()
            return
    _flush_pushes()


def _flush_pushes() -> None:
    global _push_last, _push_timer
    with _push_lock:
        ids = sorted(_push_pending)
        _push_pending.clear()
        _push_last = time.monotonic()
        if _push_timer is not None:
            _push_timer.cancel()
            _push_timer = None
    if ids:
        live.gpus_changed(ids)


def _update_metrics(gpus: list[GPU]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_UPDATE_METRICS, [_metric_rows(gpus)])


class HeartbeatRejected(Exception):
    """The report contradicts the database (e.g. a GPU UUID of another server); nothing was changed."""

    def __init__(self, field_errors: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in field_errors.items()))
        self.field_errors = field_errors


@dataclass
class HeartbeatResult:
    came_online: bool = False
    created_gpus: int = 0
    updated_gpus: int = 0
    cordoned: list[str] = field(default_factory=list)


def _error_reason(gpu: GPU, report: dict[str, Any]) -> str:
    """Why this report should cordon the GPU, or ''."""
    reasons = []
    if report["ecc_errors"] > gpu.ecc_errors:
        reasons.append(f"{report['ecc_errors']} uncorrected ECC error(s) (was {gpu.ecc_errors})")
    if report.get("xid_errors"):
        reasons.append("Xid error(s) " + ", ".join(str(x) for x in report["xid_errors"]))
    return "; ".join(reasons)


def _apply_reports(node: Node, existing: dict[int, GPU], reports: list[dict[str, Any]],
                   ) -> tuple[list[GPU], list[GPU], list[tuple[GPU, str]]]:
    """The reported values set on the GPU objects: (to update, to create, to cordon with why)."""
    to_update: list[GPU] = []
    to_create: list[GPU] = []
    errored: list[tuple[GPU, str]] = []
    for report in reports:
        gpu = existing.get(report["index"])
        new = gpu is None
        if new:
            # The count is the card's lifetime one (NVML's aggregate): what it brings along is
            # history, and only a rise from here on is an error.
            gpu = GPU(node_id=node.pk, index=report["index"], ecc_errors=report["ecc_errors"])
        reason = _error_reason(gpu, report)
        gpu.uuid = report["uuid"]
        gpu.model_name = report["name"][:100]
        gpu.memory_total_mb = report["memory_total_mb"]
        gpu.memory_used_mb = report["memory_used_mb"]
        gpu.utilization_pct = report["utilization_pct"]
        gpu.temperature_c = report["temperature_c"]
        gpu.power_w = report["power_w"]
        gpu.ecc_errors = report["ecc_errors"]
        gpu.retired_pages = report["retired_pages"]
        # What this report says; an earlier error is kept by the UPDATE itself (_UPDATE_METRICS).
        if reason:
            gpu.health = GPUHealth.ERROR
        else:
            gpu.health = GPUHealth.WARNING if report.get("retired_pages_pending") else GPUHealth.OK
        (to_create if new else to_update).append(gpu)
        if reason:
            errored.append((gpu, reason))
    return to_update, to_create, errored


def _touch_params(node: Node, data: dict[str, Any]) -> list[Any]:
    return [(data.get("agent_version") or "")[:50], (data.get("hostname") or "")[:255], node.pk]


def _touch_and_update_metrics(node: Node, data: dict[str, Any], gpus: list[GPU]) -> str:
    """``_TOUCH_NODE`` and ``_UPDATE_METRICS`` as one statement (one round trip); the old status."""
    with prepared_cursor() as cursor:
        cursor.execute(_TOUCH_AND_UPDATE_METRICS,
                       [*_touch_params(node, data), _metric_rows(gpus)])
        (old_status,) = cursor.fetchone()
    return old_status


# In the model's field order, as Model.from_db expects of a partial row.
_KNOWN_COLUMNS = tuple(f.attname for f in GPU._meta.concrete_fields
                       if f.attname in {"id", "index", "uuid", "ecc_errors", "health", "node_id", "cordoned",
                                        "cordon_reason"})
_KNOWN_GPUS = f"SELECT {', '.join(_KNOWN_COLUMNS)} FROM nodes_gpu WHERE node_id = %s"  # noqa: S608 - constants
_INDEX_AT = _KNOWN_COLUMNS.index("index")


def _known_gpus(node_id: int) -> dict[int, GPU]:
    """The server's GPUs by index, with the fields a report is checked against (the rest
    deferred, as ``.only()`` would): written by hand, because building this queryset
    was a quarter of a heartbeat's CPU in a py-spy profile of the web node."""
    with prepared_cursor() as cursor:
        cursor.execute(_KNOWN_GPUS, [node_id])
        return {row[_INDEX_AT]: GPU.from_db(connection.alias, _KNOWN_COLUMNS, row) for row in cursor.fetchall()}


def _inventory_changes(existing: dict[int, GPU], reports: list[dict[str, Any]]) -> list[tuple[GPU, str]]:
    """GPUs the report contradicts: gone from it, or another UUID at their index."""
    reported = {r["index"]: r["uuid"] for r in reports}
    changes = []
    for index, gpu in sorted(existing.items()):
        if index not in reported:
            if not (gpu.cordoned and gpu.cordon_reason.startswith(VANISHED)):
                changes.append((gpu, f"{VANISHED} (was {gpu.uuid}); uncordon it once it is back"))
        elif reported[index] != gpu.uuid:
            changes.append((gpu, f"UUID changed at index {index} from {gpu.uuid} to {reported[index]}: another "
                                 "card or a remapped index; check the server before uncordoning"))
    return changes


VANISHED = "auto: no longer reported by the agent"


def ingest(node: Node, data: dict[str, Any]) -> HeartbeatResult:
    result = HeartbeatResult()
    reports = data["gpus"]
    existing = _known_gpus(node.pk)
    inventory = _inventory_changes(existing, reports)
    # Only a GPU new to this server (or whose UUID changed) can collide with another server's.
    fresh = [g["uuid"] for g in reports if g["index"] not in existing or existing[g["index"]].uuid != g["uuid"]]
    if fresh:
        taken = dict(GPU.objects.filter(uuid__in=fresh).exclude(node_id=node.pk).values_list("uuid", "node__name"))
        if taken:
            errors = {f"gpus[{i}].uuid": [f"{g['uuid']} belongs to server {taken[g['uuid']]}"]
                      for i, g in enumerate(reports) if g["uuid"] in taken}
            raise HeartbeatRejected(errors)
    to_update, to_create, errored = _apply_reports(node, existing, reports)
    try:
        if not to_create and not errored and not inventory:
            # The usual report: the server's row and its GPUs' metrics in one statement,
            # its own transaction (no BEGIN/COMMIT round trips); pushes and the wake-up
            # below then run at once, after that commit.
            old_status = _touch_and_update_metrics(node, data, to_update)
            result.came_online = old_status == NodeStatus.OFFLINE
            result.updated_gpus = len(to_update)
            _gpus_changed(node.pk, urgent=result.came_online)
            if result.came_online:
                events.capacity_changed.send(sender=Node, reason=f"server {node.name} online")
        else:
            _ingest_in_transaction(node, data, result, to_update, to_create, errored, inventory)
        _remember_loaded_models(reports, [*to_update, *to_create])
    except IntegrityError as exc:
        # Two GPUs swapped UUIDs between reports, or a concurrent report: the whole
        # heartbeat is rolled back and the agent's next one tries again.
        detail = f"conflicts with the stored GPU layout ({exc.__class__.__name__})"
        raise HeartbeatRejected({"gpus": [detail]}) from None
    # Evidence that the portal hears agents (after commit: never a lock held with it).
    hearing.heard()
    return result


def _remember_loaded_models(reports: list[dict[str, Any]], gpus: list[GPU]) -> None:
    """Models the agent saw loaded feed the GPUs' affinity caches, like a task that named them."""
    loaded = [r for r in reports if r.get("loaded_models")]
    if not loaded:
        return
    by_index = {g.index: g for g in gpus}
    with transaction.atomic():  # remember_models locks the GPU rows it updates
        remember_models({by_index[report["index"]].pk: report["loaded_models"] for report in loaded})


def _ingest_in_transaction(node: Node, data: dict[str, Any], result: HeartbeatResult, to_update: list[GPU],
                           to_create: list[GPU], errored: list[tuple[GPU, str]],
                           inventory: list[tuple[GPU, str]]) -> None:
    """A report that adds GPUs or cordons some: one transaction, several statements."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_TOUCH_NODE, _touch_params(node, data))
            (old_status,) = cursor.fetchone()
        if to_update:
            _update_metrics(to_update)
        if to_create:
            GPU.objects.bulk_create(to_create)
        result.came_online = old_status == NodeStatus.OFFLINE
        for gpu, reason in errored:
            gpu.cordon(f"auto: {reason}")
            raise_alert(Alert.Kind.GPU_ERROR, f"{node.name}:{gpu.index} cordoned: {reason}", node=node.pk,
                        gpu=gpu)
            result.cordoned.append(f"{gpu.index}")
        for gpu, reason in inventory:
            gpu.cordon(reason if reason.startswith(VANISHED) else f"auto: {reason}")
            raise_alert(Alert.Kind.GPU_ERROR, f"{node.name}:{gpu.index} cordoned: {reason}", node=node.pk,
                        gpu=gpu)
            if str(gpu.index) not in result.cordoned:
                result.cordoned.append(f"{gpu.index}")
        errored = errored + inventory
        result.created_gpus, result.updated_gpus = len(to_create), len(to_update)
        _gpus_changed(node.pk, urgent=bool(result.came_online or errored or to_create))
        if result.came_online:
            events.capacity_changed.send(sender=Node, reason=f"server {node.name} online")
        elif errored:
            events.capacity_changed.send(sender=Node, reason=f"server {node.name}: GPU cordoned")
