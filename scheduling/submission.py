"""Task submission: the one validation path shared by the REST API (single and
batch), the portal's submit form and, through the API, the CLI.

``SubmitContext.load(user)`` reads what validation needs once per request (the
user's tenants with their quotas, the largest server and GPU). ``validate``
checks one task description and returns either a clean ``TaskSpec`` or field
errors; it never writes. ``create_tasks`` writes a batch atomically: the
tenants' quota rows are locked (stable order) while the pending-task limit is
checked, then tasks and their "submitted" events go in with two bulk inserts,
and the scheduler is woken after commit.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from portal import live
from scheduling import triggers
from scheduling.choices import Priority, ShareMode, TaskStatus, WorkloadClass
from scheduling.models import Task, TaskEvent
from tenants.models import Membership, Quota, Tenant

# Limits a user can hit (documented in the README, "Limits a user can hit").
NAME_MAX_CHARS = 200
COMMAND_MAX_CHARS = 8192
WORKING_DIR_MAX_CHARS = 1024
MODEL_NAME_MAX_CHARS = 200
GPU_MODEL_MAX_CHARS = 100
ENV_MAX_VARS = 64
ENV_MAX_BYTES = 16 * 1024
NODE_SELECTOR_MAX_LABELS = 16
BATCH_MAX_TASKS = 1000

FIELDS = (
    "tenant", "name", "command", "env", "working_dir", "gpu_count", "gpu_memory_mb", "share_mode",
    "model_name", "priority", "workload_class", "timeout_s", "node_selector", "gpu_model", "reservation",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would let "NAME\n" through
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "١٢" and "1_0"
LABEL_KEY_MAX_CHARS = 63
LABEL_VALUE_MAX_CHARS = 63
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")

Errors = dict[str, list[str]]


class SubmitError(Exception):
    """Field errors found while writing (e.g. the pending-task limit); nothing was written."""

    def __init__(self, errors: Errors | list[Errors]):
        super().__init__(str(errors))
        self.errors = errors


@dataclass(frozen=True)
class ClusterLimits:
    max_gpus_per_server: int  # 0: no server registered yet
    largest_gpu_mb: int
    safety_margin_mb: int

    @property
    def max_task_memory_mb(self) -> int:
        return max(self.largest_gpu_mb - self.safety_margin_mb, 0)

    @classmethod
    def load(cls) -> ClusterLimits:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT COALESCE(MAX(n), 0), COALESCE(MAX(m), 0) FROM "
                "(SELECT COUNT(*) AS n, MAX(memory_total_mb) AS m FROM nodes_gpu GROUP BY node_id) AS per_server"
            )
            n, m = cursor.fetchone()
        return cls(int(n), int(m), settings.SCHEDULER.memory_safety_margin_mb)


@dataclass
class TaskSpec:
    """A validated task description, ready to become a ``Task`` row."""

    tenant: Tenant
    values: dict[str, Any]


@dataclass
class SubmitContext:
    user: Any
    limits: ClusterLimits
    memberships: dict[str, Tenant] = field(default_factory=dict)  # slug -> tenant (with .quota loaded)

    @classmethod
    def load(cls, user) -> SubmitContext:
        tenants = {
            m.tenant.slug: m.tenant
            for m in Membership.objects.filter(user=user).select_related("tenant", "tenant__quota")
        }
        return cls(user=user, limits=ClusterLimits.load(), memberships=tenants)

    def tenant(self, slug: str) -> Tenant | None:
        if slug in self.memberships:
            return self.memberships[slug]
        if self.user.is_staff:
            tenant = Tenant.objects.select_related("quota").filter(slug=slug).first()
            if tenant is not None:
                self.memberships[slug] = tenant
            return tenant
        return None


def _quota(tenant: Tenant) -> Quota | None:
    try:
        return tenant.quota
    except Quota.DoesNotExist:
        return None


def _given(data: dict[str, Any], key: str, default: Any) -> Any:
    """The value, or the default when absent, null or "": a list or 0 where a name is
    expected is an error, never silently the default."""
    value = data.get(key)
    return default if value is None or value == "" else value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _as_mapping(value: Any, what: str) -> tuple[dict[str, str] | None, str | None]:
    """A JSON object of strings, or (from the web form) ``KEY=VALUE`` lines."""
    if value is None or value == "":
        return {}, None
    if isinstance(value, str):
        out: dict[str, str] = {}
        for n, line in enumerate(value.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, val = line.partition("=")
            if not sep:
                return None, f"Line {n}: expected KEY=VALUE."
            out[key.strip()] = val.strip()
        return out, None
    if not isinstance(value, dict):
        return None, f"Must be an object mapping {what} names to strings."
    for key, val in value.items():
        if not isinstance(val, (str, int, float)) or isinstance(val, bool):
            return None, f"The value of {key!r} must be a string."
    return {str(k): str(v) for k, v in value.items()}, None


def _label_problem(labels: dict[str, str]) -> str | None:
    for key, value in labels.items():
        if not key or len(key) > LABEL_KEY_MAX_CHARS or not _LABEL_KEY.fullmatch(key):
            return (f"Invalid label name {key[:80]!r}: 1 to {LABEL_KEY_MAX_CHARS} letters, digits, '.', '_', '/' "
                    "or '-', starting and ending with a letter or digit.")
        if not value or len(value) > LABEL_VALUE_MAX_CHARS:
            return f"The value of label {key!r} must have 1 to {LABEL_VALUE_MAX_CHARS} characters."
    return None


def _check_text(data: dict[str, Any], key: str, limit: int, errors: Errors, *, required: bool = False) -> str:
    value = data.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        errors[key] = ["Must be a string."]
        return ""
    value = value.strip()
    if required and not value:
        errors[key] = ["This field is required."]
    elif len(value) > limit:
        errors[key] = [f"At most {limit} characters (got {len(value)})."]
    return value


def validate(data: Any, ctx: SubmitContext) -> tuple[TaskSpec | None, Errors]:
    """Check one task description; returns ``(spec, {})`` or ``(None, field errors)``."""
    if not isinstance(data, dict):
        return None, {"non_field_errors": ["Expected a JSON object describing one task."]}
    errors: Errors = {}
    for key in sorted(set(data) - set(FIELDS)):
        errors[str(key)] = [f"Unknown field. Allowed fields: {', '.join(FIELDS)}."]
    config = settings.SCHEDULER
    limits = ctx.limits
    values: dict[str, Any] = {}

    # Tenant: named, or implied when the user belongs to exactly one.
    tenant: Tenant | None = None
    slug = data.get("tenant")
    if slug in (None, ""):
        if ctx.user.is_staff and len(ctx.memberships) != 1:
            errors["tenant"] = ["Required: name the tenant (staff may submit for any tenant)."]
        elif len(ctx.memberships) == 1:
            tenant = next(iter(ctx.memberships.values()))
        elif not ctx.memberships:
            errors["tenant"] = ["You belong to no tenant; ask an operator to add you to one."]
        else:
            errors["tenant"] = [f"Required: you belong to {', '.join(sorted(ctx.memberships))}."]
    elif not isinstance(slug, str):
        errors["tenant"] = ["Must be a tenant's short name (slug)."]
    else:
        tenant = ctx.tenant(slug.strip())
        if tenant is None:
            errors["tenant"] = [f"Unknown tenant {slug!r} (or you are not a member of it)."]
    quota = _quota(tenant) if tenant is not None else None
    if tenant is not None and quota is None:
        errors["tenant"] = [f"Tenant {tenant.slug} has no quota yet; ask an operator to set one."]

    # Command: a shell command line, or an argv list (joined with shell quoting).
    command = data.get("command")
    if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        command = shlex.join(command)
    if not isinstance(command, str) or not command.strip():
        errors["command"] = ["Required: the command line to run (a string, or a list of arguments)."]
    elif len(command) > COMMAND_MAX_CHARS:
        errors["command"] = [f"At most {COMMAND_MAX_CHARS} characters (got {len(command)})."]
    else:
        values["command"] = command.strip()

    name = _check_text(data, "name", NAME_MAX_CHARS, errors)
    if not name and "command" in values:
        # Default name: the program being run, like sbatch's job name.
        words = values["command"].split()
        name = (words[0].rsplit("/", 1)[-1] if words else "task")[:NAME_MAX_CHARS]
    values["name"] = name
    values["working_dir"] = _check_text(data, "working_dir", WORKING_DIR_MAX_CHARS, errors)
    values["model_name"] = _check_text(data, "model_name", MODEL_NAME_MAX_CHARS, errors)
    values["gpu_model"] = _check_text(data, "gpu_model", GPU_MODEL_MAX_CHARS, errors)

    env, problem = _as_mapping(data.get("env"), "variable")
    if problem:
        errors["env"] = [problem]
    elif env is not None:
        bad = [k for k in env if not _ENV_NAME.fullmatch(k)]
        size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())
        if bad:
            errors["env"] = [f"Invalid variable name {bad[0]!r}: use letters, digits and _, not starting with a digit."]
        elif len(env) > ENV_MAX_VARS:
            errors["env"] = [f"At most {ENV_MAX_VARS} variables (got {len(env)})."]
        elif size > ENV_MAX_BYTES:
            errors["env"] = [f"At most {ENV_MAX_BYTES} bytes of variables in all (got {size})."]
        else:
            values["env"] = env

    selector, problem = _as_mapping(data.get("node_selector"), "label")
    if problem:
        errors["node_selector"] = [problem]
    elif selector is not None and len(selector) > NODE_SELECTOR_MAX_LABELS:
        errors["node_selector"] = [f"At most {NODE_SELECTOR_MAX_LABELS} labels (got {len(selector)})."]
    elif selector and (problem := _label_problem(selector)):
        errors["node_selector"] = [problem]
    else:
        values["node_selector"] = selector or {}

    # GPUs: at least one, at most what the largest server has (a gang never spans servers).
    raw = data.get("gpu_count", 1)
    gpu_count = _as_int(raw if raw not in (None, "") else 1)
    if gpu_count is None:
        errors["gpu_count"] = ["Must be a whole number."]
    elif limits.max_gpus_per_server == 0:
        errors["gpu_count"] = ["No GPU server is registered yet, so no task can be placed."]
    elif not 1 <= gpu_count <= limits.max_gpus_per_server:
        errors["gpu_count"] = [
            f"Must be between 1 and {limits.max_gpus_per_server} (the most GPUs any one server has)."
        ]
    else:
        values["gpu_count"] = gpu_count

    raw = data.get("gpu_memory_mb")
    memory = None
    if raw not in (None, ""):
        memory = _as_int(raw)
        top = limits.max_task_memory_mb
        if memory is None:
            errors["gpu_memory_mb"] = ["Must be a whole number of MB (per GPU)."]
        elif not 1 <= memory <= max(top, 1):
            errors["gpu_memory_mb"] = [
                f"Must be between 1 and {top} MB per GPU (the largest GPU has {limits.largest_gpu_mb} MB, "
                f"minus the {limits.safety_margin_mb} MB safety margin)."
            ]
    values["gpu_memory_mb"] = memory

    share_mode = _given(data, "share_mode", ShareMode.EXCLUSIVE)
    if share_mode not in ShareMode.values:
        errors["share_mode"] = [f"Must be one of {', '.join(ShareMode.values)}."]
    elif share_mode == ShareMode.SHARED and memory is None and not values.get("model_name"):
        errors["share_mode"] = ["A shared task must give gpu_memory_mb (or a model_name with a known estimate)."]
    values["share_mode"] = share_mode

    raw = data.get("timeout_s")
    timeout = config.default_task_timeout_s if raw in (None, "") else _as_int(raw)
    if timeout is None or not 1 <= timeout <= config.max_task_timeout_s:
        errors["timeout_s"] = [f"Must be a whole number of seconds from 1 to {config.max_task_timeout_s}."]
    values["timeout_s"] = timeout

    raw = _given(data, "priority", "NORMAL")
    try:
        priority = Priority.from_name(raw) if isinstance(raw, str) else None
    except KeyError:
        priority = None
    if priority is None:
        errors["priority"] = [f"Must be one of {', '.join(Priority.labels)}."]
    elif quota is not None and priority > quota.max_priority:
        errors["priority"] = [
            f"Tenant {tenant.slug} may submit at most {Priority(quota.max_priority).label} priority."
        ]
    values["priority"] = priority

    workload_class = _given(data, "workload_class", WorkloadClass.BATCH)
    if workload_class not in WorkloadClass.values:
        errors["workload_class"] = [f"Must be one of {', '.join(WorkloadClass.values)}."]
    elif quota is not None and workload_class not in quota.allowed_classes:
        allowed = ", ".join(quota.allowed_classes) or "none"
        errors["workload_class"] = [f"Tenant {tenant.slug} may not submit {workload_class} tasks (allowed: {allowed})."]
    values["workload_class"] = workload_class

    # Reservation (like Slurm's --reservation): by name, of the task's own tenant, not over.
    name = data.get("reservation")
    if name not in (None, ""):
        from scheduling.models import Reservation

        res = Reservation.objects.filter(name=str(name).strip()).first() if isinstance(name, str) else None
        if res is None or (tenant is not None and res.tenant_id != tenant.pk):
            errors["reservation"] = [f"No reservation {name!r} of this tenant."]
        elif res.state in (Reservation.State.REJECTED, Reservation.State.RELEASED):
            errors["reservation"] = [f"Reservation {res.name} is {res.state}."]
        else:
            values["reservation"] = res

    if errors:
        return None, errors
    return TaskSpec(tenant=tenant, values=values), {}


def create_tasks(ctx: SubmitContext, specs: list[TaskSpec]) -> list[Task]:
    """Insert the tasks (all or none) and their "submitted" events; wake the scheduler after commit.

    Raises ``SubmitError`` when a tenant's ``max_pending_tasks`` would be exceeded.
    """
    actor = f"user:{ctx.user.get_username()}"
    wanted: dict[int, int] = {}
    for spec in specs:
        wanted[spec.tenant.pk] = wanted.get(spec.tenant.pk, 0) + 1
    with transaction.atomic():
        # The quota rows serialise concurrent submitters of one tenant, so the
        # pending limit holds exactly; other tenants are not held up.
        quotas = list(Quota.objects.select_for_update().filter(tenant_id__in=wanted).order_by("tenant_id"))
        for quota in quotas:
            limit = quota.max_pending_tasks
            # Bounded count: never scans more than the limit's worth of index entries.
            pending = Task.objects.filter(tenant_id=quota.tenant_id, status=TaskStatus.PENDING)[: limit + 1].count()
            if pending + wanted[quota.tenant_id] > limit:
                slug = next(s.tenant.slug for s in specs if s.tenant.pk == quota.tenant_id)
                raise SubmitError({"tenant": [
                    f"Tenant {slug} would have more than {limit} pending tasks (it has {pending}, "
                    f"this adds {wanted[quota.tenant_id]}); wait for some to start or cancel some."
                ]})
        tasks = Task.objects.bulk_create(
            Task(tenant=spec.tenant, submitter=ctx.user, status=TaskStatus.PENDING, attempt=0,
                 pending_reason="waiting for the scheduler", **spec.values)
            for spec in specs
        )
        TaskEvent.objects.bulk_create(
            TaskEvent(task=task, from_status="", to_status=TaskStatus.PENDING, actor=actor, reason="submitted")
            for task in tasks
        )
        live.tasks_changed((task.tenant_id, task.pk) for task in tasks)
        triggers.request_pass("submit")
    return tasks


def submit(ctx: SubmitContext, data: Any) -> Task:
    """Validate and create one task; raises ``SubmitError`` with field errors."""
    spec, errors = validate(data, ctx)
    if errors:
        raise SubmitError(errors)
    return create_tasks(ctx, [spec])[0]
