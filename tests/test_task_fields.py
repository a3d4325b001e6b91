"""A task's submit fields are declared once (scheduling.task_fields): validation, the API
schema, the portal form and the scheduler's pending snapshot all follow that table."""

from __future__ import annotations

import dataclasses

import pytest
from django.utils import timezone

from portal.api.scheduling.serializers import TaskSubmitSerializer
from scheduling import submission, task_fields
from scheduling.models import Task
from scheduling.passes import load_snapshot
from scheduling.placement import PendingTask


def test_the_pending_snapshot_fills_every_attribute_the_placement_core_takes_in_its_order():
    filled = ("id", "created_at", *(spec.pending.attr for spec in task_fields.PENDING))
    assert filled == tuple(f.name for f in dataclasses.fields(PendingTask))


def test_the_submit_schema_describes_exactly_the_fields_validate_accepts_with_the_models_widths():
    fields = TaskSubmitSerializer().fields
    assert tuple(fields) == submission.FIELDS == task_fields.FIELDS
    for spec in task_fields.TEXT_FIELDS:
        assert fields[spec.name].max_length == Task._meta.get_field(spec.name).max_length
    assert fields["command"].max_length == task_fields.COMMAND_MAX_CHARS
    assert fields["gpu_count"].default == 1 and fields["gpu_memory_mb"].allow_null


def test_the_portal_form_carries_every_field_but_the_reservation():
    assert set(task_fields.FIELDS) - set(task_fields.FORM_FIELDS) == {"reservation"}
    assert {"command", "env", "node_selector"} == task_fields.RAW_FORM_FIELDS


@pytest.mark.django_db
def test_a_submitted_task_reaches_the_snapshot_as_its_preview_describes_it(alice, servers):
    ctx = submission.SubmitContext.load(alice)
    spec, errors = submission.validate({
        "command": "torchrun train.py", "nodes": 2, "gpus_per_node": 4, "topology_key": "rack",
        "node_selector": {"zone": "a"}, "gpu_model": "H100", "model_name": "llama", "gpu_memory_mb": 30_000,
        "priority": "high", "workload_class": "online", "timeout_s": 600,
    }, ctx)
    assert not errors, errors
    task = submission.create_tasks(ctx, [spec])[0]
    loaded = next(p for p in load_snapshot(timezone.now()).snapshot.pending if p.id == task.pk)
    described = PendingTask(id=task.pk, created_at=task.created_at, **task_fields.pending_from_values(
        {**spec.values, "tenant": spec.tenant.pk, "reservation": None}))
    assert loaded == described
    assert (loaded.nodes, loaded.gpu_count, loaded.exclusive, loaded.node_selector) == (2, 8, True, {"zone": "a"})
