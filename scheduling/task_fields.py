"""What a user may say about a task, declared once.

``SPECS`` is the table of a task's submit fields: each with its kind, its limits,
its help text and default, whether the portal's submit form carries it and which
``PendingTask`` attribute the scheduler's snapshot fills from it. Everything that
lists those fields is built from here:

- ``scheduling.submission.validate`` (the allowed fields, the text limits, the defaults);
- the API's ``TaskSubmitSerializer`` (``portal.api.scheduling.serializers``), which documents
  the same limits in the OpenAPI schema;
- the portal's submit form (``portal.views.submit``: which fields it reads, which
  keep their line breaks; the template's ``maxlength`` attributes);
- the pending-task snapshot: the column list of ``scheduling.passes`` and its
  ``PendingTask`` (``pending_task``), and the preview's candidate
  (``pending_from_values``), so a new field reaches the placement core from one line
  here (and its attribute in ``PendingTask``).

Storage limits (a text column's width) are read from the ``Task`` model, so the
model and the checks cannot drift apart; limits the database does not hold
(command length, environment size) are written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from scheduling.choices import ShareMode
from scheduling.models import Task
from scheduling.placement.types import PendingTask
from tenants.choices import Priority, WorkloadClass

# Limits a user can hit (documented in the README, "Limits a user can hit").
COMMAND_MAX_CHARS = 8192
ENV_MAX_VARS = 64
ENV_MAX_BYTES = 16 * 1024
NODE_SELECTOR_MAX_LABELS = 16
LABEL_KEY_MAX_CHARS = 63
LABEL_VALUE_MAX_CHARS = 63
ARRAY_SPEC_MAX_CHARS = 200
BATCH_MAX_TASKS = 1000
ARRAY_EXTRA_ENV_VARS = 4  # what scheduling.arrays adds to each element's environment

# Kinds of field: how a value is read (submission) and documented (serializer).
TEXT = "text"  # a string, stripped, at most max_chars
COMMAND = "command"  # a command line, or a list of arguments joined with shell quoting
INTEGER = "integer"  # a whole number (JSON number or ASCII digits)
CHOICE = "choice"  # one of choices
MAPPING = "mapping"  # a JSON object of strings, or KEY=VALUE lines from the web form
TENANT = "tenant"  # a tenant's slug
RESERVATION = "reservation"  # a reservation's name
DEPENDENCY = "dependency"  # scheduling.dependencies' syntax
ARRAY = "array"  # scheduling.arrays' syntax


def _width(name: str) -> int:
    return Task._meta.get_field(name).max_length


def _as_dict(value: str | dict | None) -> dict:
    # A raw cursor hands jsonb over as text (Django decodes JSON itself); values are dicts.
    if value is None or value == "{}":
        return {}
    value = json.loads(value) if isinstance(value, str) else value
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Pending:
    """How a field reaches the placement core's ``PendingTask``: from the snapshot's row
    (``sql``, then ``from_row``) or from a validated value (``from_value``, for the preview)."""

    attr: str  # the PendingTask attribute
    sql: str = ""  # the snapshot's expression (``t`` is the task row); default: the field's column
    from_row: Callable[[Any], Any] | None = None  # what the cursor returns -> attribute value
    from_value: Callable[[Any], Any] | None = None  # validated value -> attribute value


@dataclass(frozen=True)
class TaskField:
    name: str
    kind: str
    help: str = ""
    max_chars: int | None = None
    min_value: int | None = None
    default: Any = None  # documented default (None: none, or one that depends on the cluster)
    choices: Sequence[tuple[str, str]] | Sequence[str] = ()
    required: bool = False
    nullable: bool = False
    raw: bool = False  # the web form passes it as typed (line breaks and spaces matter)
    form: bool = True  # on the portal's submit form
    pending: Pending | None = None

    @property
    def column(self) -> str:
        return Task._meta.get_field(self.name).column


SPECS: tuple[TaskField, ...] = (
    TaskField("tenant", TENANT, "Tenant slug; optional when you belong to one only.",
              pending=Pending("tenant_id")),
    TaskField("name", TEXT, max_chars=_width("name")),
    TaskField("command", COMMAND, "Shell command line (a list of arguments is also accepted).",
              max_chars=COMMAND_MAX_CHARS, required=True, raw=True),
    TaskField("env", MAPPING, f"At most {ENV_MAX_VARS} variables, {ENV_MAX_BYTES} bytes in all.", raw=True),
    TaskField("working_dir", TEXT, max_chars=_width("working_dir")),
    TaskField("gpu_count", INTEGER, "1 to the most GPUs any one server has, or a multiple of it to span that many "
              "whole servers (a gang).", min_value=1, default=1, pending=Pending("gpu_count")),
    TaskField("gpu_memory_mb", INTEGER, "Per GPU; at most the largest GPU minus the safety margin.", min_value=1,
              nullable=True,
              # No memory given: the model's remembered estimate (scheduling.passes._PENDING_SQL).
              pending=Pending("memory_mb", sql="coalesce(t.gpu_memory_mb, (SELECT e.memory_mb FROM "
                                              "scheduling_modelmemoryestimate e WHERE t.model_name <> '' "
                                              "AND e.model_name = t.model_name))")),
    TaskField("share_mode", CHOICE, choices=ShareMode.choices, default=ShareMode.EXCLUSIVE,
              pending=Pending("exclusive", sql=f"t.share_mode <> '{ShareMode.SHARED}'",
                              from_value=lambda mode: mode != ShareMode.SHARED)),
    TaskField("model_name", TEXT, max_chars=_width("model_name"), pending=Pending("model_name")),
    TaskField("priority", CHOICE, "At most the tenant quota's max_priority.", choices=Priority.labels,
              default="NORMAL", pending=Pending("priority", from_value=int)),
    TaskField("workload_class", CHOICE, "One of the tenant quota's allowed_classes.", choices=WorkloadClass.choices,
              default=WorkloadClass.BATCH, pending=Pending("workload_class")),
    TaskField("timeout_s", INTEGER, "Default 3600, at most the max.", min_value=1, pending=Pending("timeout_s")),
    TaskField("node_selector", MAPPING, raw=True, pending=Pending("node_selector", from_row=_as_dict)),
    TaskField("gpu_model", TEXT, max_chars=_width("gpu_model"), pending=Pending("gpu_model")),
    TaskField("nodes", INTEGER, "Servers of a gang, one process (rank) on each; at most the servers registered. "
              "With gpus_per_node or gpu_count.", min_value=1, pending=Pending("nodes")),
    TaskField("gpus_per_node", INTEGER, "GPUs on each server of a gang.", min_value=1),
    TaskField("topology_key", TEXT, "A server label all of a gang's servers share, e.g. rack.",
              max_chars=_width("topology_key"), pending=Pending("topology_key")),
    TaskField("dependency", DEPENDENCY, 'Start only after other tasks you can see end: {"after_ok": [12, 13], '
              '"after_any": [14], "after_not_ok": [15]} or Slurm\'s "afterok:12:13,afterany:14".'),
    TaskField("array", ARRAY, 'Many tasks at once, Slurm\'s syntax: "0-99%8" (indexes 0..99, at most 8 running), '
              '"1,3,5-7", "0-15:4". Each gets TASK_ARRAY_INDEX and SLURM_ARRAY_TASK_ID; the response is the first '
              'element.', max_chars=ARRAY_SPEC_MAX_CHARS),
    TaskField("reservation", RESERVATION, "Run only on this reservation's GPUs, inside its window (a reservation "
              "of the same tenant).", form=False, pending=Pending("reservation_id")),
)

BY_NAME: dict[str, TaskField] = {f.name: f for f in SPECS}
FIELDS: tuple[str, ...] = tuple(f.name for f in SPECS)
TEXT_FIELDS: tuple[TaskField, ...] = tuple(f for f in SPECS if f.kind == TEXT)
FORM_FIELDS: tuple[str, ...] = tuple(f.name for f in SPECS if f.form)
RAW_FORM_FIELDS: frozenset[str] = frozenset(f.name for f in SPECS if f.form and f.raw)

# The snapshot's columns, in one order for the SELECT and for the rows it returns: PendingTask's
# own, so each task is built from its row by position (2,000 of them: 1.2 ms, against 4.3 ms
# by keyword).
_POSITION = {f.name: i for i, f in enumerate(fields(PendingTask))}
PENDING: tuple[TaskField, ...] = tuple(sorted((f for f in SPECS if f.pending is not None),
                                              key=lambda f: _POSITION[f.pending.attr]))
if tuple(_POSITION)[2:] != tuple(f.pending.attr for f in PENDING):
    raise RuntimeError("PendingTask's fields after id and created_at must be exactly the ones SPECS fills")
_CONVERT_AT = tuple((i, f.pending.from_row) for i, f in enumerate(PENDING) if f.pending.from_row is not None)


def pending_columns() -> str:
    """The SELECT list that reads ``PENDING`` from the task row ``t``."""
    return ", ".join(f.pending.sql or f't."{f.column}"' for f in PENDING)


def pending_task(task_id: int, created_at: datetime, columns: list[Any]) -> PendingTask:
    """The ``PendingTask`` of a snapshot row: its id, its creation time and the values of
    ``PENDING``, in order (the few that need it are converted in place)."""
    for i, convert in _CONVERT_AT:
        columns[i] = convert(columns[i])
    return PendingTask(task_id, created_at, *columns)


def pending_from_values(values: dict[str, Any]) -> dict[str, Any]:
    """``PendingTask`` keyword arguments from values by field name, as stored (ids for
    the tenant and reservation; the memory the snapshot would resolve)."""
    return {f.pending.attr: values.get(f.name) if f.pending.from_value is None else f.pending.from_value(
        values.get(f.name)) for f in PENDING}
