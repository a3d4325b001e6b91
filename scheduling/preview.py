""""Would it fit now, or why not": a dry run of the placement core for one task.

Loads the same snapshot a scheduling pass reads (``scheduling.passes.load_snapshot``;
no lock, nothing written), adds the candidate at the back of its priority level as
if submitted now, and runs ``scheduling.placement.schedule`` on it. Tasks already queued
ahead of it take their GPUs first, exactly as in a real pass, so the answer is what
the next pass would decide if nothing else changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.utils import timezone
from django.utils.translation import gettext as _

from scheduling import task_fields
from scheduling.models import ModelMemoryEstimate
from scheduling.passes import load_snapshot
from scheduling.placement import PendingTask, schedule
from scheduling.reasons import translate_reason
from scheduling.submission import TaskSpec

CANDIDATE_ID = -1  # real task ids are positive


@dataclass(frozen=True)
class Preview:
    fits: bool
    message: str
    server: str | None = None
    gpus: list[str] = field(default_factory=list)
    queue_position: int | None = None


def would_fit(spec: TaskSpec) -> Preview:
    v = spec.values
    memory = v["gpu_memory_mb"]
    if memory is None and v["model_name"]:
        memory = (ModelMemoryEstimate.objects.filter(model_name=v["model_name"])
                  .values_list("memory_mb", flat=True).first())
    now = timezone.now()
    snapshot = load_snapshot(now).snapshot
    # As the snapshot would read it back (task_fields.PENDING): ids, and the resolved memory.
    stored = {**v, "tenant": spec.tenant.pk, "gpu_memory_mb": memory,
              "reservation": v["reservation"].pk if v.get("reservation") is not None else None}
    snapshot.pending.append(PendingTask(id=CANDIDATE_ID, created_at=now, **task_fields.pending_from_values(stored)))
    plan = schedule(snapshot)
    placement = next((p for p in plan.placements if p.task_id == CANDIDATE_ID), None)
    if placement is not None:
        node = next(n for n in snapshot.nodes if n.id == placement.node_id)
        where = {g.id: f"{n.name}:{g.index}" for n in snapshot.nodes for g in n.gpus}
        gpus = [where[g] for g in placement.gpu_ids]
        if placement.ranks:
            names = {n.id: n.name for n in snapshot.nodes}
            servers = ", ".join(names[n] for n, _gpus in placement.ranks)
            return Preview(True, _("Would start now as a gang on %(servers)s (rank 0 on %(server)s).")
                           % {"servers": servers, "server": node.name}, node.name, gpus)
        return Preview(True, _("Would start now on %(server)s (GPUs %(gpus)s).") % {"server": node.name,
                                                                               "gpus": ", ".join(gpus)},
                       node.name, gpus)
    info = plan.pending.get(CANDIDATE_ID)
    # The core's reason in the reader's language (scheduling.reasons), without a doubled full stop.
    reason = translate_reason(info.reason if info is not None else "the scheduler would not place it now").rstrip(".")
    if info is not None and info.never_fits:
        # Waiting cannot help: no server could hold it even with every task gone.
        return Preview(False, _("Can never fit on this cluster: %(reason)s.") % {"reason": reason})
    return Preview(False, _("Would wait: %(reason)s.") % {"reason": reason},
                   queue_position=info.position if info else None)
