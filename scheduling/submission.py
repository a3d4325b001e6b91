"""Task submission: the one validation path shared by the REST API (single and
batch), the portal's submit form and, through the API, the CLI.

``SubmitContext.load(user)`` reads what validation needs once per request (the
user's tenants with their quotas, the largest server and GPU). ``validate``
checks one task description and returns either a clean ``TaskSpec`` or field
errors; it never writes. It runs named steps in order (``_STEPS``: shape, tenant,
command and texts, env and labels, gang, memory and sharing, timeout, the quota's
rules, reservation, dependency, array); the fields, their limits and defaults are
declared once in ``scheduling.task_fields``. ``create_tasks`` writes a batch atomically: the
tenants' quota rows are locked (stable order), then one statement inserts the
tasks and their "submitted" events and reads the tenant's pending count for the
limit (a bound the database keeps while it leaves room, else a count:
``models.PendingBound``); the scheduler is woken after commit.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils.translation import gettext as _

from kernel.prepared import prepared_cursor
from scheduling import access, arrays, dependencies, lifecycle, task_fields
from scheduling.choices import ShareMode, TaskStatus
from scheduling.models import Reservation, Task, TaskArray, TaskDependency
from tenants.choices import Priority, WorkloadClass
from tenants.models import Quota, Tenant

# The limits live with the field table (scheduling.task_fields); named here too for callers.
BATCH_MAX_TASKS = task_fields.BATCH_MAX_TASKS
COMMAND_MAX_CHARS = task_fields.COMMAND_MAX_CHARS
ENV_MAX_VARS = task_fields.ENV_MAX_VARS
ENV_MAX_BYTES = task_fields.ENV_MAX_BYTES
NODE_SELECTOR_MAX_LABELS = task_fields.NODE_SELECTOR_MAX_LABELS
LABEL_KEY_MAX_CHARS = task_fields.LABEL_KEY_MAX_CHARS
LABEL_VALUE_MAX_CHARS = task_fields.LABEL_VALUE_MAX_CHARS
FIELDS = task_fields.FIELDS

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would let "NAME\n" through
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "١٢" and "1_0"
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")
# The accepted values, as sets: Django builds a choices list afresh on each read of .values
# (in a batch of 500 tasks that was 8% of the request). Checked for str first: a set refuses
# an unhashable value (a list sent as share_mode) with TypeError.
_SHARE_MODES = frozenset(ShareMode.values)
_WORKLOAD_CLASSES = frozenset(WorkloadClass.values)

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

    # The figures as one array: the most GPUs on one server, the largest GPU, the servers with GPUs.
    SQL = ("SELECT ARRAY[COALESCE(MAX(n), 0), COALESCE(MAX(m), 0), COUNT(*)] FROM "
           "(SELECT COUNT(*) AS n, MAX(memory_total_mb) AS m FROM nodes_gpu GROUP BY node_id) AS per_server")
    # The GPU inventory's generation (nodes migration 0008): it moves, in the same transaction,
    # with any change to the rows SQL reads. The membership query carries it (SubmitContext.load).
    GENERATION_SQL = "SELECT value FROM nodes_gpu_inventory_generation WHERE id = 1"

    @classmethod
    def load(cls, generation: int | None = None) -> ClusterLimits:
        """The limits as of ``generation`` (read by the caller): this process keeps the last
        figures it read with their generation, so a submit aggregates every GPU row (2.5 ms of
        PostgreSQL's CPU at 8,000 GPUs) only after the inventory changed. Without a generation
        (its row gone), read afresh and keep nothing."""
        global _kept_limits
        kept = _kept_limits
        if generation is None or kept is None or kept[0] != generation:
            with connection.cursor() as cursor:
                # Both in one statement: the figures are exactly those of the generation kept with them.
                cursor.execute(f"SELECT ({cls.GENERATION_SQL}), ({cls.SQL})")
                kept = cursor.fetchone()
            if kept[0] is not None:
                _kept_limits = kept
        return cls.from_array(kept[1])

    @classmethod
    def from_array(cls, figures: list[int]) -> ClusterLimits:
        n, m, servers = figures
        return cls(int(n), int(m), settings.SCHEDULER.memory_safety_margin_mb, int(servers))


# This process's last (generation, figures) of ClusterLimits; replaced whole, so threads share it safely.
_kept_limits: tuple[int, list[int]] | None = None


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
    query (a second one when the GPU inventory changed since this process last read the
    limits); the limits' row comes back even for a user of no tenant."""
    with prepared_cursor() as cursor:
        cursor.execute(
            f"SELECT ({ClusterLimits.GENERATION_SQL}), {_TENANT.sql}, {_QUOTA.sql} "  # noqa: S608 - column names only
            "FROM (SELECT 1) AS one LEFT JOIN (tenants_membership m JOIN tenants_tenant t ON t.id = m.tenant_id "
            "LEFT JOIN tenants_quota q ON q.tenant_id = t.id) ON m.user_id = %s ORDER BY t.id",
            [user_id],
        )
        rows = cursor.fetchall()
    limits = ClusterLimits.load(rows[0][0])
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


@dataclass
class _Check:
    """One task description being checked: what was given, what is clean so far, what is wrong.
    Each step below reads ``data``, writes its fields' clean values or errors, and never raises."""

    data: dict[str, Any]
    ctx: SubmitContext
    values: dict[str, Any] = field(default_factory=dict)
    errors: Errors = field(default_factory=dict)
    tenant: Tenant | None = None
    quota: Quota | None = None
    dependencies: list[tuple[str, int]] = field(default_factory=list)
    array: tuple[str, list[int], int] | None = None

    def fail(self, key: str, message: str) -> None:
        self.errors[key] = [message]


def _check_shape(c: _Check) -> None:
    """Only the declared fields (scheduling.task_fields)."""
    for key in sorted(set(c.data) - set(FIELDS)):
        c.fail(str(key), _("Unknown field. Allowed fields: %(fields)s.") % {"fields": ", ".join(FIELDS)})


def _check_tenant(c: _Check) -> None:
    """The tenant: named (one the user belongs to; staff: any), or implied when the user
    belongs to exactly one; it must have a quota."""
    ctx, slug = c.ctx, c.data.get("tenant")
    if slug in (None, ""):
        if ctx.user.is_staff and len(ctx.memberships) != 1:
            c.fail("tenant", _("Required: name the tenant (staff may submit for any tenant)."))
        elif len(ctx.memberships) == 1:
            c.tenant = next(iter(ctx.memberships.values()))
        elif not ctx.memberships:
            c.fail("tenant", _("You belong to no tenant; ask an operator to add you to one."))
        else:
            c.fail("tenant", _("Required: you belong to %(tenants)s.")
                   % {"tenants": ", ".join(sorted(ctx.memberships))})
    elif not isinstance(slug, str):
        c.fail("tenant", _("Must be a tenant's short name (slug)."))
    else:
        c.tenant = ctx.tenant(slug.strip())
        if c.tenant is None:
            c.fail("tenant", _("Unknown tenant %(slug)r (or you are not a member of it).") % {"slug": slug})
    c.quota = _quota(c.tenant) if c.tenant is not None else None
    if c.tenant is not None and c.quota is None:
        c.fail("tenant", _("Tenant %(slug)s has no quota yet; ask an operator to set one.") % {"slug": c.tenant.slug})


def _check_command(c: _Check) -> None:
    """A shell command line, or an argv list (joined with shell quoting)."""
    command = c.data.get("command")
    if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        command = shlex.join(command)
    if not isinstance(command, str) or not command.strip():
        c.fail("command", _("Required: the command line to run (a string, or a list of arguments)."))
    elif len(command) > COMMAND_MAX_CHARS:
        c.fail("command", _("At most %(limit)s characters (got %(got)s).")
               % {"limit": COMMAND_MAX_CHARS, "got": len(command)})
    else:
        c.values["command"] = command.strip()


def _check_texts(c: _Check) -> None:
    """The plain text fields, each within its column's width; the name defaults to the
    program being run, like sbatch's job name."""
    for spec in task_fields.TEXT_FIELDS:
        c.values[spec.name] = _check_text(c.data, spec.name, spec.max_chars, c.errors)
    if not c.values["name"] and "command" in c.values:
        words = c.values["command"].split()
        c.values["name"] = (words[0].rsplit("/", 1)[-1] if words else "task")[:task_fields.BY_NAME["name"].max_chars]


def _check_env(c: _Check) -> None:
    env, problem = _as_mapping(c.data.get("env"), "variable")
    if problem:
        c.fail("env", problem)
        return
    if env is None:
        return
    bad = [k for k in env if not _ENV_NAME.fullmatch(k)]
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())
    if bad:
        c.fail("env", _("Invalid variable name %(name)r: use letters, digits and _, not starting with a digit.")
               % {"name": bad[0]})
    elif len(env) > ENV_MAX_VARS:
        c.fail("env", _("At most %(limit)s variables (got %(got)s).") % {"limit": ENV_MAX_VARS, "got": len(env)})
    elif size > ENV_MAX_BYTES:
        c.fail("env", _("At most %(limit)s bytes of variables in all (got %(got)s).")
               % {"limit": ENV_MAX_BYTES, "got": size})
    else:
        c.values["env"] = env


def _check_node_selector(c: _Check) -> None:
    selector, problem = _as_mapping(c.data.get("node_selector"), "label")
    if problem:
        c.fail("node_selector", problem)
    elif selector is not None and len(selector) > NODE_SELECTOR_MAX_LABELS:
        c.fail("node_selector", _("At most %(limit)s labels (got %(got)s).")
               % {"limit": NODE_SELECTOR_MAX_LABELS, "got": len(selector)})
    elif selector and (problem := _label_problem(selector)):
        c.fail("node_selector", problem)
    else:
        c.values["node_selector"] = selector or {}


def _check_gang(c: _Check) -> None:
    """How many GPUs on how many servers (``_check_gpus``); a topology key only for a gang."""
    _check_gpus(c.data, c.ctx.limits, c.values, c.errors)
    if c.values["topology_key"] and c.values.get("nodes", 1) == 1 and "topology_key" not in c.errors:
        c.fail("topology_key", _("Only for a task over several servers (nodes above 1)."))


def _check_memory_and_sharing(c: _Check) -> None:
    """Memory per GPU within the largest GPU (less the safety margin); a shared task says
    how much it needs and stays on one server."""
    limits, raw, memory = c.ctx.limits, c.data.get("gpu_memory_mb"), None
    if raw not in (None, ""):
        memory = _as_int(raw)
        top = limits.max_task_memory_mb
        if memory is None:
            c.fail("gpu_memory_mb", _("Must be a whole number of MB (per GPU)."))
        elif not 1 <= memory <= max(top, 1):
            c.fail("gpu_memory_mb", _("Must be between 1 and %(top)s MB per GPU (the largest GPU has %(largest)s MB, "
                                      "minus the %(margin)s MB safety margin).")
                   % {"top": top, "largest": limits.largest_gpu_mb, "margin": limits.safety_margin_mb})
    c.values["gpu_memory_mb"] = memory

    share_mode = _given(c.data, "share_mode", task_fields.BY_NAME["share_mode"].default)
    if not (isinstance(share_mode, str) and share_mode in _SHARE_MODES):
        c.fail("share_mode", _("Must be one of %(choices)s.") % {"choices": ", ".join(ShareMode.values)})
    elif share_mode == ShareMode.SHARED and c.values.get("nodes", 1) > 1:
        c.fail("share_mode", _("A task over several servers takes whole GPUs: share_mode must be exclusive."))
    elif share_mode == ShareMode.SHARED and memory is None and not c.values.get("model_name"):
        c.fail("share_mode", _("A shared task must give gpu_memory_mb (or a model_name with a known estimate)."))
    c.values["share_mode"] = share_mode


def _check_timeout(c: _Check) -> None:
    config, raw = settings.SCHEDULER, c.data.get("timeout_s")
    timeout = config.default_task_timeout_s if raw in (None, "") else _as_int(raw)
    if timeout is None or not 1 <= timeout <= config.max_task_timeout_s:
        c.fail("timeout_s", _("Must be a whole number of seconds from 1 to %(max)s.")
               % {"max": config.max_task_timeout_s})
    c.values["timeout_s"] = timeout


def _check_quota_rules(c: _Check) -> None:
    """Priority and workload class: known values, and ones the tenant's quota allows."""
    raw = _given(c.data, "priority", task_fields.BY_NAME["priority"].default)
    try:
        priority = Priority.from_name(raw) if isinstance(raw, str) else None
    except KeyError:
        priority = None
    if priority is None:
        c.fail("priority", _("Must be one of %(choices)s.") % {"choices": ", ".join(Priority.labels)})
    elif c.quota is not None and priority > c.quota.max_priority:
        c.fail("priority", _("Tenant %(slug)s may submit at most %(priority)s priority.")
               % {"slug": c.tenant.slug, "priority": Priority(c.quota.max_priority).label})
    c.values["priority"] = priority

    workload_class = _given(c.data, "workload_class", task_fields.BY_NAME["workload_class"].default)
    if not (isinstance(workload_class, str) and workload_class in _WORKLOAD_CLASSES):
        c.fail("workload_class", _("Must be one of %(choices)s.") % {"choices": ", ".join(WorkloadClass.values)})
    elif c.quota is not None and workload_class not in c.quota.allowed_classes:
        allowed = ", ".join(c.quota.allowed_classes) or "none"
        c.fail("workload_class", _("Tenant %(slug)s may not submit %(cls)s tasks (allowed: %(allowed)s).")
               % {"slug": c.tenant.slug, "cls": workload_class, "allowed": allowed})
    c.values["workload_class"] = workload_class


def _check_reservation(c: _Check) -> None:
    """By name (like Slurm's --reservation), of the task's own tenant, and not over."""
    name = c.data.get("reservation")
    if name in (None, ""):
        return
    res = Reservation.objects.filter(name=str(name).strip()).first() if isinstance(name, str) else None
    if res is None or (c.tenant is not None and res.tenant_id != c.tenant.pk):
        c.fail("reservation", _("No reservation %(name)r of this tenant.") % {"name": name})
    elif res.state in (Reservation.State.REJECTED, Reservation.State.RELEASED):
        c.fail("reservation", _("Reservation %(name)s is %(state)s.")
               % {"name": res.name, "state": res.get_state_display()})
    else:
        c.values["reservation"] = res


def _check_dependency(c: _Check) -> None:
    """Tasks to wait for: well-formed, and all of them tasks the user can see."""
    deps, problem = dependencies.parse(c.data.get("dependency"))
    if problem:
        c.fail("dependency", problem)
        return
    c.dependencies = deps
    if deps:
        wanted = {tid for _kind, tid in deps}
        visible = set(access.tasks_for(c.ctx.user).filter(pk__in=wanted).values_list("pk", flat=True))
        unknown = dependencies.unknown_ids(deps, visible)
        if unknown:
            c.fail("dependency", _("Unknown task %(ids)s (or not one you can see).")
                   % {"ids": ", ".join(f"#{i}" for i in unknown)})


def _check_array(c: _Check) -> None:
    """An array spec within the batch limit; each element's extra variables must fit the env limit."""
    spec = c.data.get("array")
    if spec in (None, ""):
        return
    indexes, throttle, problem = arrays.parse(spec, BATCH_MAX_TASKS)
    if problem:
        c.fail("array", problem)
    elif len(c.values.get("env") or {}) + task_fields.ARRAY_EXTRA_ENV_VARS > ENV_MAX_VARS:
        c.fail("env", _("At most %(n)s variables in an array (each element gets %(extra)s more).")
               % {"n": ENV_MAX_VARS - task_fields.ARRAY_EXTRA_ENV_VARS, "extra": task_fields.ARRAY_EXTRA_ENV_VARS})
    else:
        c.array = (spec.strip()[:task_fields.ARRAY_SPEC_MAX_CHARS], indexes, throttle)


# In this order: later steps read what earlier ones cleaned (the gang's server count,
# the memory, the tenant's quota).
_STEPS = (_check_shape, _check_tenant, _check_command, _check_texts, _check_env, _check_node_selector,
          _check_gang, _check_memory_and_sharing, _check_timeout, _check_quota_rules, _check_reservation,
          _check_dependency, _check_array)


def validate(data: Any, ctx: SubmitContext) -> tuple[TaskSpec | None, Errors]:
    """Check one task description; returns ``(spec, {})`` or ``(None, field errors)``."""
    if not isinstance(data, dict):
        return None, {"non_field_errors": [_("Expected a JSON object describing one task.")]}
    check = _Check(data, ctx)
    for step in _STEPS:
        step(check)
    if check.errors:
        return None, check.errors
    return TaskSpec(tenant=check.tenant, values=check.values, dependencies=check.dependencies,
                    array=check.array), {}


# One tenant's quota row (nearly every submit) by equality, not as an array of one: PostgreSQL
# estimates "= ANY($1)" of an unknown array at ten rows and a sort, so the prepared statement's
# generic plan never looked cheaper than planning for the array at hand, and every execution
# was planned afresh (0.1 ms of the server's CPU per submit, pg_stat_statements' "plans").
_LOCK_QUOTA = "SELECT tenant_id, max_pending_tasks FROM tenants_quota WHERE tenant_id = %s FOR UPDATE"
_LOCK_QUOTAS = ("SELECT tenant_id, max_pending_tasks FROM tenants_quota WHERE tenant_id = ANY(%s::bigint[]) "
                "ORDER BY tenant_id FOR UPDATE")


def create_tasks(ctx: SubmitContext, specs: list[TaskSpec]) -> list[Task]:
    """Insert the tasks (all or none) and their "submitted" events; wake the scheduler after commit.

    Raises ``SubmitError`` when a tenant's ``max_pending_tasks`` would be exceeded.
    """
    actor = f"user:{ctx.user.get_username()}"
    wanted: dict[int, int] = {}
    for spec in specs:
        wanted[spec.tenant.pk] = wanted.get(spec.tenant.pk, 0) + spec.count
    with transaction.atomic(), lifecycle.batch() as fan:
        # The quota rows serialise concurrent submitters of one tenant, so the
        # pending limit holds exactly; other tenants are not held up.
        with prepared_cursor() as cursor:
            if len(wanted) == 1:
                cursor.execute(_LOCK_QUOTA, list(wanted))
            else:
                cursor.execute(_LOCK_QUOTAS, [sorted(wanted)])
            limits = dict(cursor.fetchall())
        gone = sorted({s.tenant.slug for s in specs if s.tenant.pk not in limits})
        if gone:
            # The quota (or the whole tenant) was removed after the request was checked: refuse it
            # as validation would have, rather than insert tasks with no pending limit, or ones the
            # commit's foreign-key check turns into a server error.
            raise SubmitError({"tenant": [
                _("Tenant %(slug)s has no quota yet; ask an operator to set one.") % {"slug": slug} for slug in gone]})
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
        # Read (bound or count) by the same statement that inserts, which starts after the lock
        # above is held: it sees every task committed by an earlier holder, and not its own.
        pending = lifecycle.submit_many(tasks, actor=actor, limits=limits, fan=fan)
        for tenant_id, limit in sorted(limits.items()):
            if pending[tenant_id] + wanted[tenant_id] > limit:
                slug = next(s.tenant.slug for s in specs if s.tenant.pk == tenant_id)
                raise SubmitError({"tenant": [  # raised inside atomic(): the insert is rolled back
                    _("Tenant %(slug)s would have more than %(limit)s pending tasks (it has %(has)s, this adds "
                      "%(adds)s); wait for some to start or cancel some.")
                    % {"slug": slug, "limit": limit, "has": pending[tenant_id], "adds": wanted[tenant_id]}
                ]})
        dependencies = [TaskDependency(task=task, depends_on_id=other, kind=kind)
                        for task, (_row, spec) in zip(tasks, rows, strict=True) for kind, other in spec.dependencies]
        if dependencies:  # an empty bulk_create still costs a submit 20 µs
            TaskDependency.objects.bulk_create(dependencies)
    return tasks


def submit(ctx: SubmitContext, data: Any) -> Task:
    """Validate and create one task; raises ``SubmitError`` with field errors."""
    spec, errors = validate(data, ctx)
    if errors:
        raise SubmitError(errors)
    return create_tasks(ctx, [spec])[0]
