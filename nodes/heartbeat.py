"""Heartbeat ingestion: one agent report becomes a handful of statements.

GPU rows are updated with one ``bulk_update`` per report (created on first
report), the server's ``last_heartbeat_at`` is the *database* clock (agent
clocks may be wrong), and a GPU that reports new uncorrected ECC errors or a
critical Xid error is cordoned with the reason and raises an Alert. Pushes and
the scheduler wake-up go out after commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models.functions import Now
from django.utils import timezone

from nodes.models import GPU, GPUHealth, Node, NodeStatus
from portal import live
from portal.models import Alert
from scheduling import triggers

METRIC_FIELDS = ["uuid", "model_name", "memory_total_mb", "memory_used_mb", "utilization_pct", "temperature_c",
                 "power_w", "ecc_errors", "retired_pages", "health", "updated_at"]


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


def ingest(node: Node, data: dict[str, Any]) -> HeartbeatResult:
    result = HeartbeatResult()
    reports = data["gpus"]
    uuids = [g["uuid"] for g in reports]
    taken = dict(GPU.objects.filter(uuid__in=uuids).exclude(node_id=node.pk).values_list("uuid", "node__name"))
    if taken:
        errors = {f"gpus[{i}].uuid": [f"{g['uuid']} belongs to server {taken[g['uuid']]}"]
                  for i, g in enumerate(reports) if g["uuid"] in taken}
        raise HeartbeatRejected(errors)
    try:
        with transaction.atomic():
            locked = Node.objects.select_for_update().only("status").get(pk=node.pk)
            updates: dict[str, Any] = {"last_heartbeat_at": Now(), "updated_at": Now()}
            if data.get("agent_version"):
                updates["agent_version"] = data["agent_version"][:50]
            if data.get("hostname"):
                updates["hostname"] = data["hostname"][:255]
            if locked.status == NodeStatus.OFFLINE:
                updates["status"], updates["status_reason"] = NodeStatus.ACTIVE, "heartbeat received"
                result.came_online = True
            Node.objects.filter(pk=node.pk).update(**updates)

            now = timezone.now()
            existing = {g.index: g for g in GPU.objects.filter(node_id=node.pk)}
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
                gpu.updated_at = now
                if reason:
                    gpu.health = GPUHealth.ERROR
                elif gpu.health != GPUHealth.ERROR:
                    gpu.health = GPUHealth.WARNING if report.get("retired_pages_pending") else GPUHealth.OK
                (to_create if new else to_update).append(gpu)
                if reason:
                    errored.append((gpu, reason))
            if to_update:
                GPU.objects.bulk_update(to_update, METRIC_FIELDS)
            if to_create:
                GPU.objects.bulk_create(to_create)
            for gpu, reason in errored:
                gpu.cordon(f"auto: {reason}")
                Alert.objects.create(kind=Alert.Kind.GPU_ERROR, severity=Alert.Severity.CRITICAL, node_id=node.pk,
                                     gpu=gpu, message=f"{node.name}:{gpu.index} cordoned: {reason}"[:500])
                result.cordoned.append(f"{gpu.index}")
            result.created_gpus, result.updated_gpus = len(to_create), len(to_update)
            live.gpus_changed([node.pk])
            if result.came_online:
                triggers.request_pass(f"server {node.name} online")
            elif errored:
                triggers.request_pass(f"server {node.name}: GPU cordoned")
    except IntegrityError as exc:
        # Two GPUs swapped UUIDs between reports, or a concurrent report: the whole
        # heartbeat is rolled back and the agent's next one tries again.
        detail = f"conflicts with the stored GPU layout ({exc.__class__.__name__})"
        raise HeartbeatRejected({"gpus": [detail]}) from None
    return result
