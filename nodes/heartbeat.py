"""Heartbeat ingestion: one agent report becomes a handful of statements.

GPU rows are updated with one UPDATE statement per report (created on first
report), the server's ``last_heartbeat_at`` is the *database* clock (agent
clocks may be wrong), and a GPU that reports new uncorrected ECC errors or a
critical Xid error is cordoned with the reason and raises an Alert. The
inventory is checked against what the portal knows: a GPU the agent stops
reporting, or whose UUID changes at its index, is cordoned at once with the
reason and an Alert (never silently given to a task or accepted). Pushes and the
scheduler wake-up go out after commit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, connection, transaction

from nodes.models import GPU, GPUHealth, Node, NodeStatus
from portal import hearing, live
from portal.alerts import raise_alert
from portal.models import Alert
from scheduling import triggers

# One UPDATE for all of a server's GPUs. (``bulk_update`` builds a CASE expression per
# field and row: about 15 ms of CPU for 8 GPUs, which alone would cap a web process
# near 60 heartbeats/s; this statement costs well under a millisecond to build.)
_UPDATE_METRICS = """
UPDATE nodes_gpu AS g SET
    uuid = v.uuid, model_name = v.model_name, memory_total_mb = v.memory_total_mb,
    memory_used_mb = v.memory_used_mb, utilization_pct = v.utilization_pct, temperature_c = v.temperature_c,
    power_w = v.power_w, ecc_errors = v.ecc_errors, retired_pages = v.retired_pages, health = v.health,
    updated_at = now()
FROM unnest(%s::bigint[], %s::varchar[], %s::varchar[], %s::int[], %s::int[], %s::int[], %s::int[], %s::int[],
            %s::bigint[], %s::int[], %s::varchar[])
    AS v(id, uuid, model_name, memory_total_mb, memory_used_mb, utilization_pct, temperature_c, power_w,
         ecc_errors, retired_pages, health)
WHERE g.id = v.id
"""
_METRIC_COLUMNS = ("pk", "uuid", "model_name", "memory_total_mb", "memory_used_mb", "utilization_pct",
                   "temperature_c", "power_w", "ecc_errors", "retired_pages", "health")


# Heartbeat time is the database's clock; the old status tells whether the server came back.
_TOUCH_NODE = """
UPDATE nodes_node AS n SET
    last_heartbeat_at = statement_timestamp(), updated_at = statement_timestamp(),
    agent_version = COALESCE(NULLIF(%s, ''), n.agent_version),
    hostname = COALESCE(NULLIF(%s, ''), n.hostname),
    status = CASE WHEN o.status = 'offline' THEN n.intent ELSE n.status END,
    status_reason = CASE WHEN o.status = 'offline' THEN 'heartbeat received' ELSE n.status_reason END
FROM (SELECT id, status FROM nodes_node WHERE id = %s FOR UPDATE) AS o
WHERE n.id = o.id
RETURNING o.status
"""

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
        cursor.execute(_UPDATE_METRICS, [[getattr(g, c) for g in gpus] for c in _METRIC_COLUMNS])


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
    existing = {g.index: g for g in GPU.objects.filter(node_id=node.pk).only(
        "id", "index", "uuid", "ecc_errors", "health", "node_id", "cordoned", "cordon_reason")}
    inventory = _inventory_changes(existing, reports)
    # Only a GPU new to this server (or whose UUID changed) can collide with another server's.
    fresh = [g["uuid"] for g in reports if g["index"] not in existing or existing[g["index"]].uuid != g["uuid"]]
    if fresh:
        taken = dict(GPU.objects.filter(uuid__in=fresh).exclude(node_id=node.pk).values_list("uuid", "node__name"))
        if taken:
            errors = {f"gpus[{i}].uuid": [f"{g['uuid']} belongs to server {taken[g['uuid']]}"]
                      for i, g in enumerate(reports) if g["uuid"] in taken}
            raise HeartbeatRejected(errors)
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(_TOUCH_NODE, [(data.get("agent_version") or "")[:50],
                                             (data.get("hostname") or "")[:255], node.pk])
                (old_status,) = cursor.fetchone()
            result.came_online = old_status == NodeStatus.OFFLINE

            to_update: list[GPU] = []
            to_create: list[GPU] = []
            errored: list[tuple[GPU, str]] = []
            for report in reports:
                gpu = existing.get(report["index"])
                new = gpu is None
                if new:
                    gpu = GPU(node_id=node.pk, index=report["index"])
                    gpu.ecc_errors = 0
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
                if reason:
                    gpu.health = GPUHealth.ERROR
                elif gpu.health != GPUHealth.ERROR:
                    gpu.health = GPUHealth.WARNING if report.get("retired_pages_pending") else GPUHealth.OK
                (to_create if new else to_update).append(gpu)
                if reason:
                    errored.append((gpu, reason))
            if to_update:
                _update_metrics(to_update)
            if to_create:
                GPU.objects.bulk_create(to_create)
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
            errored += inventory
            result.created_gpus, result.updated_gpus = len(to_create), len(to_update)
            _gpus_changed(node.pk, urgent=bool(result.came_online or errored or to_create))
            if result.came_online:
                triggers.request_pass(f"server {node.name} online")
            elif errored:
                triggers.request_pass(f"server {node.name}: GPU cordoned")
    except IntegrityError as exc:
        # Two GPUs swapped UUIDs between reports, or a concurrent report: the whole
        # heartbeat is rolled back and the agent's next one tries again.
        detail = f"conflicts with the stored GPU layout ({exc.__class__.__name__})"
        raise HeartbeatRejected({"gpus": [detail]}) from None
    # Evidence that the portal hears agents (after commit: never a lock held with it).
    hearing.heard()
    return result
