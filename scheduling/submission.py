"""Task submission: the one validation path shared by the REST API (single and
batch), the portal's submit form and, through the API, the CLI.

``SubmitContext.load(user)`` reads what validation needs once per request (the
user's tenants with their quotas, the largest server and GPU). ``validate``
checks one task description and returns either a clean ``TaskSpec`` or field
errors; it never writes. ``create_tasks`` writes a batch atomically: the
tenants' quota rows are locked (stable order), then one statement inserts the
tasks and their "submitted" events and counts the pending tasks the limit is
checked against; the scheduler is woken after commit.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models.sql import InsertQuery
from django.utils import timezone
from django.utils.translation import gettext as _

from portal import live
from scheduling import access, arrays, dependencies, triggers
from scheduling.choices import Priority, ShareMode, TaskStatus, WorkloadClass
from scheduling.models import Task, TaskArray, TaskDependency
from tenants.models import Quota, Tenant

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
    "model_name", "priority", "workload_class", "timeout_s", "node_selector", "gpu_model",
    "nodes", "gpus_per_node", "topology_key", "dependency", "array", "reservation",
)
TOPOLOGY_KEY_MAX_CHARS = 100
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
    servers: int = 1  # servers with GPUs: the most a gang can span

    @property
    def max_task_memory_mb(self) -> int:
        return max(self.largest_gpu_mb - self.safety_margin_mb, 0)

    # The figures as one array, so the membership query can carry them (SubmitContext.load).
    SQL = ("SELECT ARRAY[COALESCE(MAX(n), 0), COALESCE(MAX(m), 0), COUNT(*)] FROM "
           "(SELECT COUNT(*) AS n, MAX(memory_total_mb) AS m FROM nodes_gpu GROUP BY node_id) AS per_server")

    @classmethod
    def load(cls) -> ClusterLimits:
        with connection.cursor() as cursor:
            cursor.execute(cls.SQL)
            return cls.from_array(cursor.fetchone()[0])

    @classmethod
    def from_array(cls, figures: list[int]) -> ClusterLimits:
        n, m, servers = figures
        return cls(int(n), int(m), settings.SCHEDULER.memory_safety_margin_mb, int(servers))


@dataclass
class TaskSpec:
    """A validated task description, ready to become a ``Task`` row."""

    tenant: Tenant
    values: dict[str, Any]
    dependencies: list[tuple[str, int]] = field(default_factory=list)  # (kind, task id)
    # An array: (spec as given, element indexes, throttle); None for one task.
    array: tuple[str, list[int], int] | None = None

    @property
    def count(self) -> int:
        return len(self.array[1]) if self.array else 1


@dataclass
class SubmitContext:
    user: Any
    limits: ClusterLimits
    memberships: dict[str, Tenant] = field(default_factory=dict)  # slug -> tenant (with .quota loaded)

    @classmethod
    def load(cls, user) -> SubmitContext:
        limits, tenants = _load_memberships(user.pk)
        return cls(user=user, limits=limits, memberships={t.slug: t for t in tenants})

    def tenant(self, slug: str) -> Tenant | None:
        if slug in self.memberships:
            return self.memberships[slug]
        if self.user.is_staff:
            tenant = Tenant.objects.select_related("quota").filter(slug=slug).first()
            if tenant is not None:
                self.memberships[slug] = tenant
            return tenant
        return None


class _Columns:
    """A model's columns for a hand-written SELECT, and the rows turned back into
    instances exactly as the ORM would (its converters applied): every request
    loads tenants and quotas, and building that join through the ORM costs more
    CPU than the rest of the query."""

    def __init__(self, model, alias: str) -> None:
        self.model = model
        self.fields = list(model._meta.concrete_fields)
        self.sql = ", ".join(f'{alias}."{f.column}"' for f in self.fields)
        self.attnames = [f.attname for f in self.fields]
        self._converters: list | None = None

    def instance(self, values: tuple):
        if self._converters is None:  # built on first use: needs the connection's backend
            self._converters = []
            for f in self.fields:
                col = f.get_col(self.model._meta.db_table)
                converters = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
                self._converters.append((col, converters))
        converted = []
        for value, (col, converters) in zip(values, self._converters, strict=True):
            for convert in converters:
                value = convert(value, col, connection)
            converted.append(value)
        return self.model.from_db(connection.alias, self.attnames, converted)


_TENANT = _Columns(Tenant, "t")
_QUOTA = _Columns(Quota, "q")


def _load_memberships(user_id: int) -> tuple[ClusterLimits, list[Tenant]]:
    """The cluster limits and the user's tenants (each with its quota, or none), in one
    query; the limits' row comes back even for a user of no tenant."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT ({ClusterLimits.SQL}), {_TENANT.sql}, {_QUOTA.sql} "  # noqa: S608 - column names only
            "FROM (SELECT 1) AS one LEFT JOIN (tenants_membership m JOIN tenants_tenant t ON t.id = m.tenant_id "
            "LEFT JOIN tenants_quota q ON q.tenant_id = t.id) ON m.user_id = %s ORDER BY t.id",
            [user_id],
        )
        rows = cursor.fetchall()
    limits = ClusterLimits.from_array(rows[0][0])
    quota_rel = Tenant._meta.get_field("quota")
    tenants = []
    n = len(_TENANT.fields)
    for row in rows:
        if row[1] is None:  # no membership: only the limits
            continue
        tenant = _TENANT.instance(row[1:1 + n])
        quota_values = row[1 + n:]
        quota = None if quota_values[0] is None else _QUOTA.instance(quota_values)
        quota_rel.set_cached_value(tenant, quota)  # tenant.quota without a query (None: DoesNotExist)
        tenants.append(tenant)
    return limits, tenants


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
                return None, _("Line %(n)s: expected KEY=VALUE.") % {"n": n}
            out[key.strip()] = val.strip()
        return out, None
    if not isinstance(value, dict):
        return None, _("Must be an object mapping %(what)s names to strings.") % {"what": what}
    for key, val in value.items():
        if not isinstance(val, (str, int, float)) or isinstance(val, bool):
            return None, _("The value of %(key)r must be a string.") % {"key": key}
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
        errors[key] = [_("Must be a string.")]
        return ""
    value = value.strip()
    if required and not value:
        errors[key] = [_("This field is required.")]
    elif len(value) > limit:
        errors[key] = [_("At most %(limit)s characters (got %(got)s).") % {"limit": limit, "got": len(value)}]
    return value


def _check_gpus(data: dict[str, Any], limits: ClusterLimits, values: dict[str, Any], errors: Errors) -> None:
    """GPUs on one server (1 to the largest server's count), or a gang: ``nodes`` servers with
    ``gpus_per_node`` each. Any two of gpu_count, nodes and gpus_per_node imply the third, and a
    gpu_count that is a multiple of the largest server's GPUs spans that many whole servers."""
    parsed: dict[str, int | None] = {}
    for key in ("gpu_count", "nodes", "gpus_per_node"):
        raw = data.get(key)
        parsed[key] = None if raw in (None, "") else _as_int(raw)
        if raw not in (None, "") and parsed[key] is None:
            errors[key] = [_("Must be a whole number.")]
    if errors.keys() & parsed.keys():
        return
    top, servers = limits.max_gpus_per_server, limits.servers
    if top == 0:
        errors["gpu_count"] = [_("No GPU server is registered yet, so no task can be placed.")]
        return
    count, nodes, per = parsed["gpu_count"], parsed["nodes"], parsed["gpus_per_node"]
    if nodes is not None and not 1 <= nodes <= servers:
        errors["nodes"] = [_("Must be between 1 and %(n)s (the servers registered).") % {"n": servers}]
    if per is not None and not 1 <= per <= top:
        errors["gpus_per_node"] = [_("Must be between 1 and %(top)s (the most GPUs any one server has).")
                                    % {"top": top}]
    if count is not None and count < 1:
        errors["gpu_count"] = [_("Must be between 1 and %(top)s (the most GPUs any one server has), or a multiple "
                                 "of %(top)s to span whole servers.") % {"top": top}]
    if errors.keys() & parsed.keys():
        return
    if nodes is not None and per is not None:
        if count is not None and count != nodes * per:
            errors["gpu_count"] = [_("Must equal nodes x gpus_per_node (%(n)s), or be left out.") % {"n": nodes * per}]
            return
        count = nodes * per
    elif nodes is not None:
        if count is None:
            errors["gpus_per_node"] = [_("Required with nodes (or give gpu_count).")]
            return
        if count % nodes:
            errors["gpu_count"] = [_("Must be a multiple of nodes (%(n)s): every server gets as many GPUs.")
                                   % {"n": nodes}]
            return
    elif per is not None:
        count = per if count is None else count
        if count % per:
            errors["gpu_count"] = [_("Must be a multiple of gpus_per_node (%(n)s).") % {"n": per}]
            return
        nodes = count // per
    else:
        count = 1 if count is None else count
        nodes = 1
        if count > top:
            if count % top or count // top > servers:
                errors["gpu_count"] = [
                    _("Must be between 1 and %(top)s (the most GPUs any one server has), or a multiple of %(top)s "
                      "up to %(most)s to span whole servers (or give nodes and gpus_per_node).")
                    % {"top": top, "most": top * servers}
                ]
                return
            nodes = count // top
    if nodes > servers:
        errors["nodes"] = [_("Must be between 1 and %(n)s (the servers registered).") % {"n": servers}]
    elif count // nodes > top:
        errors["gpus_per_node"] = [_("Must be between 1 and %(top)s (the most GPUs any one server has).")
                                    % {"top": top}]
    else:
        values["gpu_count"], values["nodes"] = count, nodes


def validate(data: Any, ctx: SubmitContext) -> tuple[TaskSpec | None, Errors]:
    """Check one task description; returns ``(spec, {})`` or ``(None, field errors)``."""
    if not isinstance(data, dict):
        return None, {"non_field_errors": [_("Expected a JSON object describing one task.")]}
    errors: Errors = {}
    for key in sorted(set(data) - set(FIELDS)):
        errors[str(key)] = [_("Unknown field. Allowed fields: %(fields)s.") % {"fields": ", ".join(FIELDS)}]
    config = settings.SCHEDULER
    limits = ctx.limits
    values: dict[str, Any] = {}

    # Tenant: named, or implied when the user belongs to exactly one.
    tenant: Tenant | None = None
    slug = data.get("tenant")
    if slug in (None, ""):
        if ctx.user.is_staff and len(ctx.memberships) != 1:
            errors["tenant"] = [_("Required: name the tenant (staff may submit for any tenant).")]
        elif len(ctx.memberships) == 1:
            tenant = next(iter(ctx.memberships.values()))
        elif not ctx.memberships:
            errors["tenant"] = [_("You belong to no tenant; ask an operator to add you to one.")]
        else:
            errors["tenant"] = [_("Required: you belong to %(tenants)s.")
                                % {"tenants": ", ".join(sorted(ctx.memberships))}]
    elif not isinstance(slug, str):
        errors["tenant"] = [_("Must be a tenant's short name (slug).")]
    else:
        tenant = ctx.tenant(slug.strip())
        if tenant is None:
            errors["tenant"] = [_("Unknown tenant %(slug)r (or you are not a member of it).") % {"slug": slug}]
    quota = _quota(tenant) if tenant is not None else None
    if tenant is not None and quota is None:
        errors["tenant"] = [_("Tenant %(slug)s has no quota yet; ask an operator to set one.") % {"slug": tenant.slug}]

    # Command: a shell command line, or an argv list (joined with shell quoting).
    command = data.get("command")
    if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        command = shlex.join(command)
    if not isinstance(command, str) or not command.strip():
        errors["command"] = [_("Required: the command line to run (a string, or a list of arguments).")]
    elif len(command) > COMMAND_MAX_CHARS:
        errors["command"] = [_("At most %(limit)s characters (got %(got)s).")
                             % {"limit": COMMAND_MAX_CHARS, "got": len(command)}]
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
            errors["env"] = [_("Invalid variable name %(name)r: use letters, digits and _, not starting with a digit.")
                              % {"name": bad[0]}]
        elif len(env) > ENV_MAX_VARS:
            errors["env"] = [_("At most %(limit)s variables (got %(got)s).") % {"limit": ENV_MAX_VARS, "got": len(env)}]
        elif size > ENV_MAX_BYTES:
            errors["env"] = [_("At most %(limit)s bytes of variables in all (got %(got)s).")
                             % {"limit": ENV_MAX_BYTES, "got": size}]
        else:
            values["env"] = env

    selector, problem = _as_mapping(data.get("node_selector"), "label")
    if problem:
        errors["node_selector"] = [problem]
    elif selector is not None and len(selector) > NODE_SELECTOR_MAX_LABELS:
        errors["node_selector"] = [_("At most %(limit)s labels (got %(got)s).") % {"limit": NODE_SELECTOR_MAX_LABELS,
                                                                             "got": len(selector)}]
    elif selector and (problem := _label_problem(selector)):
        errors["node_selector"] = [problem]
    else:
        values["node_selector"] = selector or {}

    _check_gpus(data, limits, values, errors)
    values["topology_key"] = _check_text(data, "topology_key", TOPOLOGY_KEY_MAX_CHARS, errors)
    if values["topology_key"] and values.get("nodes", 1) == 1 and "topology_key" not in errors:
        errors["topology_key"] = [_("Only for a task over several servers (nodes above 1).")]

    raw = data.get("gpu_memory_mb")
    memory = None
    if raw not in (None, ""):
        memory = _as_int(raw)
        top = limits.max_task_memory_mb
        if memory is None:
            errors["gpu_memory_mb"] = [_("Must be a whole number of MB (per GPU).")]
        elif not 1 <= memory <= max(top, 1):
            errors["gpu_memory_mb"] = [
                _("Must be between 1 and %(top)s MB per GPU (the largest GPU has %(largest)s MB, "
                  "minus the %(margin)s MB safety margin).")
                % {"top": top, "largest": limits.largest_gpu_mb, "margin": limits.safety_margin_mb}
            ]
    values["gpu_memory_mb"] = memory

    share_mode = _given(data, "share_mode", ShareMode.EXCLUSIVE)
    if share_mode not in ShareMode.values:
        errors["share_mode"] = [_("Must be one of %(choices)s.") % {"choices": ", ".join(ShareMode.values)}]
    elif share_mode == ShareMode.SHARED and values.get("nodes", 1) > 1:
        errors["share_mode"] = [_("A task over several servers takes whole GPUs: share_mode must be exclusive.")]
    elif share_mode == ShareMode.SHARED and memory is None and not values.get("model_name"):
        errors["share_mode"] = [_("A shared task must give gpu_memory_mb (or a model_name with a known estimate).")]
    values["share_mode"] = share_mode

    raw = data.get("timeout_s")
    timeout = config.default_task_timeout_s if raw in (None, "") else _as_int(raw)
    if timeout is None or not 1 <= timeout <= config.max_task_timeout_s:
        errors["timeout_s"] = [_("Must be a whole number of seconds from 1 to %(max)s.")
                               % {"max": config.max_task_timeout_s}]
    values["timeout_s"] = timeout

    raw = _given(data, "priority", "NORMAL")
    try:
        priority = Priority.from_name(raw) if isinstance(raw, str) else None
    except KeyError:
        priority = None
    if priority is None:
        errors["priority"] = [_("Must be one of %(choices)s.") % {"choices": ", ".join(Priority.labels)}]
    elif quota is not None and priority > quota.max_priority:
        errors["priority"] = [
            _("Tenant %(slug)s may submit at most %(priority)s priority.")
            % {"slug": tenant.slug, "priority": Priority(quota.max_priority).label}
        ]
    values["priority"] = priority

    workload_class = _given(data, "workload_class", WorkloadClass.BATCH)
    if workload_class not in WorkloadClass.values:
        errors["workload_class"] = [_("Must be one of %(choices)s.") % {"choices": ", ".join(WorkloadClass.values)}]
    elif quota is not None and workload_class not in quota.allowed_classes:
        allowed = ", ".join(quota.allowed_classes) or "none"
        errors["workload_class"] = [_("Tenant %(slug)s may not submit %(cls)s tasks (allowed: %(allowed)s).")
                                     % {"slug": tenant.slug, "cls": workload_class, "allowed": allowed}]
    values["workload_class"] = workload_class

    # Reservation (like Slurm's --reservation): by name, of the task's own tenant, not over.
    name = data.get("reservation")
    if name not in (None, ""):
        from scheduling.models import Reservation

        res = Reservation.objects.filter(name=str(name).strip()).first() if isinstance(name, str) else None
        if res is None or (tenant is not None and res.tenant_id != tenant.pk):
            errors["reservation"] = [_("No reservation %(name)r of this tenant.") % {"name": name}]
        elif res.state in (Reservation.State.REJECTED, Reservation.State.RELEASED):
            errors["reservation"] = [_("Reservation %(name)s is %(state)s.") % {"name": res.name,
                                                                              "state": res.get_state_display()}]
        else:
            values["reservation"] = res

    deps, problem = dependencies.parse(data.get("dependency"))
    if problem:
        errors["dependency"] = [problem]
    elif deps:
        wanted = {tid for _kind, tid in deps}
        visible = set(access.tasks_for(ctx.user).filter(pk__in=wanted).values_list("pk", flat=True))
        unknown = dependencies.unknown_ids(deps, visible)
        if unknown:
            errors["dependency"] = [_("Unknown task %(ids)s (or not one you can see).")
                                    % {"ids": ", ".join(f"#{i}" for i in unknown)}]

    array = None
    if data.get("array") not in (None, ""):
        indexes, throttle, problem = arrays.parse(data["array"], BATCH_MAX_TASKS)
        if problem:
            errors["array"] = [problem]
        elif len(values.get("env") or {}) + 4 > ENV_MAX_VARS:
            errors["env"] = [_("At most %(n)s variables in an array (each element gets 4 more).")
                              % {"n": ENV_MAX_VARS - 4}]
        else:
            array = (data["array"].strip()[:200], indexes, throttle)

    if errors:
        return None, errors
    return TaskSpec(tenant=tenant, values=values, dependencies=deps, array=array), {}


def create_tasks(ctx: SubmitContext, specs: list[TaskSpec]) -> list[Task]:
    """Insert the tasks (all or none) and their "submitted" events; wake the scheduler after commit.

    Raises ``SubmitError`` when a tenant's ``max_pending_tasks`` would be exceeded.
    """
    actor = f"user:{ctx.user.get_username()}"
    wanted: dict[int, int] = {}
    for spec in specs:
        wanted[spec.tenant.pk] = wanted.get(spec.tenant.pk, 0) + spec.count
    with transaction.atomic():
        # The quota rows serialise concurrent submitters of one tenant, so the
        # pending limit holds exactly; other tenants are not held up.
        with connection.cursor() as cursor:
            cursor.execute("SELECT tenant_id, max_pending_tasks FROM tenants_quota WHERE tenant_id = ANY(%s::bigint[]) "
                           "ORDER BY tenant_id FOR UPDATE", [sorted(wanted)])
            limits = dict(cursor.fetchall())
        rows: list[tuple[Task, TaskSpec]] = []
        for spec in specs:
            if spec.array is None:
                rows.append((Task(tenant=spec.tenant, submitter=ctx.user, status=TaskStatus.PENDING, attempt=0,
                                  pending_reason="waiting for the scheduler", **spec.values), spec))
                continue
            text, indexes, throttle = spec.array
            array = TaskArray.objects.create(tenant=spec.tenant, submitter=ctx.user, name=spec.values["name"],
                                             spec=text, size=len(indexes), throttle=throttle)
            values = {k: v for k, v in spec.values.items() if k != "env"}
            for i in indexes:
                env = {**(spec.values.get("env") or {}), **arrays.environment(array.pk, i)}
                rows.append((Task(tenant=spec.tenant, submitter=ctx.user, status=TaskStatus.PENDING, attempt=0,
                                  pending_reason="waiting for the scheduler", array=array, array_index=i, env=env,
                                  **values), spec))
        tasks = [task for task, _spec in rows]
        # Counted by the same statement that inserts, which starts after the lock above
        # is held: it sees every task committed by an earlier holder, and not its own.
        pending = _insert_with_events(tasks, actor, limits)
        for tenant_id, limit in sorted(limits.items()):
            if pending[tenant_id] + wanted[tenant_id] > limit:
                slug = next(s.tenant.slug for s in specs if s.tenant.pk == tenant_id)
                raise SubmitError({"tenant": [  # raised inside atomic(): the insert is rolled back
                    _("Tenant %(slug)s would have more than %(limit)s pending tasks (it has %(has)s, this adds "
                      "%(adds)s); wait for some to start or cancel some.")
                    % {"slug": slug, "limit": limit, "has": pending[tenant_id], "adds": wanted[tenant_id]}
                ]})
        TaskDependency.objects.bulk_create(
            TaskDependency(task=task, depends_on_id=other, kind=kind)
            for task, (_row, spec) in zip(tasks, rows, strict=True) for kind, other in spec.dependencies
        )
        live.tasks_changed((task.tenant_id, task.pk) for task in tasks)
        triggers.request_pass("submit")
    return tasks


# The tasks' INSERT (compiled by Django from the model, so every field and default
# is the ORM's), their "submitted" events and each tenant's bounded pending count,
# in one statement: one round trip for any number of tasks.
_INSERT_WITH_EVENTS = """
WITH new_task AS ({insert} RETURNING id),
event AS (
    INSERT INTO scheduling_taskevent (task_id, from_status, to_status, actor, reason, created_at)
    SELECT id, '', %s, %s, 'submitted', %s FROM new_task
),
pending AS (
    SELECT q.tenant_id, (SELECT count(*) FROM (
        SELECT 1 FROM scheduling_task t WHERE t.tenant_id = q.tenant_id AND t.status = %s LIMIT q.lim + 1
    ) AS bounded) AS n
    FROM unnest(%s::bigint[], %s::bigint[]) AS q(tenant_id, lim)
)
SELECT id, NULL, NULL FROM new_task
UNION ALL
SELECT NULL, tenant_id, n FROM pending
"""


def _insert_with_events(tasks: list[Task], actor: str, limits: dict[int, int]) -> dict[int, int]:
    """Insert ``tasks`` (setting their ids) with their events; returns the tenants'
    pending-task counts from before the insert, each counted up to its limit + 1."""
    fields = [f for f in Task._meta.concrete_fields if not f.primary_key and not f.generated]
    query = InsertQuery(Task)
    query.insert_values(fields, tasks)
    (insert, params), = query.get_compiler(connection=connection).as_sql()
    tenant_ids = sorted(limits)
    with connection.cursor() as cursor:
        cursor.execute(_INSERT_WITH_EVENTS.format(insert=insert), [
            *params, TaskStatus.PENDING, actor, timezone.now(),
            TaskStatus.PENDING, tenant_ids, [limits[t] for t in tenant_ids],
        ])
        rows = cursor.fetchall()
    ids = [task_id for task_id, _, _ in rows if task_id is not None]
    for task, task_id in zip(tasks, ids, strict=True):
        task.pk = task_id
        task._state.adding, task._state.db = False, connection.alias
    return {tenant_id: n for task_id, tenant_id, n in rows if task_id is None}


def submit(ctx: SubmitContext, data: Any) -> Task:
    """Validate and create one task; raises ``SubmitError`` with field errors."""
    spec, errors = validate(data, ctx)
    if errors:
        raise SubmitError(errors)
    return create_tasks(ctx, [spec])[0]
