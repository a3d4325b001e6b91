"""Tasks, their GPU allocations and their history.

A task's state and its allocations always change together, in one transaction,
through the methods on ``Task`` below; the database enforces the invariants a
Python bug must never break (see ``Allocation.Meta``).
"""

from __future__ import annotations

import pghistory
from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import BigIntegerRangeField, DateTimeRangeField, RangeOperators
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from kernel.constraints import CompositeForeignKey
from scheduling.choices import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    TRANSITIONS,
    ShareMode,
    TaskStatus,
)
from tenants.choices import Priority, WorkloadClass


class InvalidTransition(ValidationError):
    pass


_START_IDLE_CLOCK_SQL = """
UPDATE nodes_gpu SET idle_since = %s
WHERE id IN (
    SELECT g.id FROM nodes_gpu g
    WHERE g.id = ANY(%s::bigint[])
      AND NOT EXISTS (SELECT 1 FROM scheduling_allocation a WHERE a.gpu_id = g.id AND a.released_at IS NULL)
    ORDER BY g.id FOR UPDATE SKIP LOCKED
)
"""


def _default_max_retries() -> int:
    return settings.SCHEDULER.default_max_retries


class Task(models.Model):
    # No index of its own: task_tenant_status_idx (tenant, status) leads with it. Every placement
    # and every state change rewrites a task row into each of the table's indexes.
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="tasks", db_index=False)
    submitter = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks"
    )
    name = models.CharField(_("name"), max_length=200)
    command = models.TextField(_("command"))
    env = models.JSONField(default=dict, blank=True)
    working_dir = models.CharField(max_length=1024, blank=True)

    gpu_count = models.PositiveSmallIntegerField(_("GPUs"), default=1)
    # Per GPU. Null: use the remembered estimate for model_name (raised after an OOM).
    gpu_memory_mb = models.PositiveIntegerField(_("GPU memory (MB)"), null=True, blank=True)
    share_mode = models.CharField(max_length=10, choices=ShareMode.choices, default=ShareMode.EXCLUSIVE)
    model_name = models.CharField(max_length=200, blank=True)
    priority = models.IntegerField(_("priority"), choices=Priority.choices, default=Priority.NORMAL)
    workload_class = models.CharField(_("class"), max_length=10, choices=WorkloadClass.choices,
                                      default=WorkloadClass.BATCH)
    timeout_s = models.PositiveIntegerField(default=3600)
    node_selector = models.JSONField(default=dict, blank=True, help_text=_("Labels the server must carry."))
    gpu_model = models.CharField(max_length=100, blank=True, help_text=_("GPU model the task needs, e.g. H100."))
    # A gang across servers: gpu_count GPUs split evenly over ``nodes`` servers, one process
    # (rank) per server; with ``topology_key`` all of them share that label's value.
    nodes = models.PositiveSmallIntegerField(default=1, help_text="Servers of a gang (1: one server).")
    topology_key = models.CharField(max_length=100, blank=True,
                                    help_text="Label all of a gang's servers must share, e.g. rack.")
    # Set for a gang's current attempt once every rank is ready (the start barrier opens):
    # rank 0's address as its agent reported it and the port it chose there.
    master_addr = models.CharField(max_length=255, blank=True)
    master_port = models.PositiveIntegerField(null=True, blank=True)
    # An element of an array (scheduling.arrays): its index in the array.
    # Indexed where set (task_array_idx, task_reservation_idx): most tasks have neither, and
    # those rows then cost no index entry when a placement or state change rewrites them.
    array = models.ForeignKey("TaskArray", null=True, blank=True, on_delete=models.CASCADE, related_name="tasks",
                              db_index=False)
    array_index = models.PositiveIntegerField(null=True, blank=True)
    reservation = models.ForeignKey("Reservation", null=True, blank=True, on_delete=models.SET_NULL, db_index=False,
                                    related_name="tasks", help_text="Run only on this reservation's GPUs.")

    status = models.CharField(_("status"), max_length=10, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    pending_reason = models.CharField(_("pending reason"), max_length=500, blank=True)
    queue_position = models.PositiveIntegerField(_("queue position"), null=True, blank=True)
    node = models.ForeignKey(
        "nodes.Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", verbose_name=_("server"),
        help_text=_("Server of the current (or last) allocation."),
    )
    exit_code = models.IntegerField(_("exit code"), null=True, blank=True)
    failure_reason = models.CharField(_("failure reason"), max_length=500, blank=True)
    oom = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(_("attempt"), default=0)
    max_retries = models.PositiveIntegerField(default=_default_max_retries)

    created_at = models.DateTimeField(_("submitted"), default=timezone.now, db_index=False)
    assigned_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = _("task")
        verbose_name_plural = _("tasks")
        ordering = ["-created_at"]
        indexes = [
            # The scheduler's queue scan: pending tasks in priority, then FIFO order.
            models.Index(F("priority").desc(), "created_at", "id", name="task_pending_queue_idx",
                         condition=Q(status=TaskStatus.PENDING)),
            models.Index(fields=["tenant", "status"], name="task_tenant_status_idx"),
            models.Index(fields=["status", "node"], name="task_status_node_idx"),
            models.Index(fields=["-created_at"], name="task_created_idx"),
            models.Index(fields=["array"], name="task_array_idx", condition=Q(array__isnull=False)),
            models.Index(fields=["reservation"], name="task_reservation_idx", condition=Q(reservation__isnull=False)),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="task_gpu_count_positive"),
            models.CheckConstraint(condition=Q(nodes__gte=1) & Q(gpu_count__gte=F("nodes")),
                                   name="task_nodes_within_gpu_count"),
            models.CheckConstraint(condition=Q(timeout_s__gte=1), name="task_timeout_positive"),
            models.CheckConstraint(condition=Q(status__in=TaskStatus.values), name="task_status_valid"),
            models.CheckConstraint(condition=Q(priority__gte=0) & Q(priority__lte=3), name="task_priority_valid"),
            models.CheckConstraint(condition=Q(workload_class__in=WorkloadClass.values),
                                   name="task_workload_class_valid"),
            models.CheckConstraint(condition=Q(share_mode__in=ShareMode.values), name="task_share_mode_valid"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def is_gang(self) -> bool:
        return self.nodes > 1

    @property
    def gpus_per_node(self) -> int:
        return self.gpu_count // max(self.nodes, 1)

    def current_ranks(self) -> list[TaskRank]:
        """A gang's ranks of its current attempt, rank 0 first (none for a one-server task)."""
        if not self.is_gang:
            return []
        return list(self.ranks.filter(attempt=self.attempt).select_related("node").order_by("rank"))

    def node_ids(self) -> list[int]:
        """Every server running (a rank of) this task's current attempt, to tell their agents."""
        if self.is_gang:
            ids = [r.node_id for r in self.current_ranks()]
            if ids:
                return ids
        return [self.node_id] if self.node_id is not None else []

    def runs_on(self, node_id: int) -> bool:
        if self.node_id == node_id:
            return True
        return self.is_gang and self.ranks.filter(attempt=self.attempt, node_id=node_id).exists()

    # --- the state machine ---------------------------------------------------------
    # Callers hold the row lock (``Task.objects.select_for_update()``) inside
    # ``transaction.atomic()``; each method writes the task, its allocations and an
    # event together.

    def transition(self, to: str, *, actor: str, reason: str = "", save_fields: tuple[str, ...] = ()) -> TaskEvent:
        if to not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"task {self.pk}: {self.status} -> {to} is not allowed")
        event = TaskEvent(task=self, from_status=self.status, to_status=to, actor=actor, reason=reason[:500])
        self.status = to
        now = timezone.now()
        fields = {"status", "updated_at", *save_fields}
        if to in FINAL_STATUSES:
            self.finished_at = now
            self.queue_position = None
            self.pending_reason = ""
            fields |= {"finished_at", "queue_position", "pending_reason"}
        if to == TaskStatus.RUNNING:
            self.started_at = now
            fields.add("started_at")
        self.save(update_fields=sorted(fields))
        event.save()
        return event

    def release_allocations(self) -> int:
        now = timezone.now()
        active = self.allocations.filter(released_at__isnull=True)
        gpu_ids = list(active.values_list("gpu_id", flat=True))
        # Database time, so the GPU's next interval (opened by a pass on any host) starts after.
        released = active.update(released_at=ClockTimestamp())
        if gpu_ids:
            # Start the idle clock (the idle-time score) of GPUs nobody holds any more, here
            # rather than in the pass, to keep GPU row writes out of the scheduler lock.
            # SKIP LOCKED: never wait for an agent heartbeat writing the same GPU row.
            with connection.cursor() as cursor:
                cursor.execute(_START_IDLE_CLOCK_SQL, [now, gpu_ids])
        return released

    def mark_running(self, *, actor: str) -> TaskEvent:
        return self.transition(TaskStatus.RUNNING, actor=actor, reason="process started")

    def finish(self, *, exit_code: int | None, actor: str, reason: str = "", oom: bool = False,
               timed_out: bool = False) -> TaskEvent:
        self.release_allocations()
        self.exit_code, self.oom = exit_code, oom
        if timed_out:
            to = TaskStatus.TIMED_OUT
            reason = reason or f"exceeded its timeout of {self.timeout_s} s"
        elif exit_code == 0 and not oom:
            to = TaskStatus.SUCCEEDED
        else:
            to = TaskStatus.FAILED
            reason = reason or ("CUDA out of memory" if oom else f"exit code {exit_code}")
        # A success clears what an earlier attempt failed with (an OOM before a retry).
        self.failure_reason = reason[:500] if to != TaskStatus.SUCCEEDED else ""
        return self.transition(to, actor=actor, reason=reason, save_fields=("exit_code", "oom", "failure_reason"))

    def cancel(self, *, actor: str, reason: str = "cancelled") -> TaskEvent:
        self.release_allocations()
        return self.transition(TaskStatus.CANCELLED, actor=actor, reason=reason)

    def requeue(self, *, actor: str, reason: str) -> TaskEvent:
        """Back to pending with one more attempt, or failed once retries are spent."""
        self.release_allocations()
        if self.attempt >= self.max_retries:
            self.failure_reason = f"{reason} (no retries left)"[:500]
            return self.transition(TaskStatus.FAILED, actor=actor, reason=self.failure_reason,
                                   save_fields=("failure_reason",))
        self.attempt += 1
        self.node = None
        self.assigned_at = self.started_at = None
        self.master_addr, self.master_port = "", None
        self.pending_reason = f"requeued: {reason}"[:500]
        return self.transition(
            TaskStatus.PENDING, actor=actor, reason=reason,
            save_fields=("attempt", "node", "assigned_at", "started_at", "pending_reason", "master_addr",
                         "master_port"),
        )

    @classmethod
    def active_on(cls, node_id: int) -> models.QuerySet[Task]:
        """Active tasks with a process on this server: its own, and gangs with a rank here."""
        gang_ids = list(TaskRank.objects.filter(node_id=node_id, task__status__in=ACTIVE_STATUSES,
                                                attempt=F("task__attempt")).values_list("task_id", flat=True))
        where = Q(node_id=node_id) | Q(pk__in=gang_ids) if gang_ids else Q(node_id=node_id)
        return cls.objects.filter(where, status__in=ACTIVE_STATUSES)

    @classmethod
    def locked(cls, pk: int) -> Task:
        """The task with its row locked; call inside ``transaction.atomic()``."""
        return cls.objects.select_for_update(of=("self",)).get(pk=pk)


class TaskArray(models.Model):
    """Many tasks from one submission (``array: "0-99%8"``); at most ``throttle`` run at once."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="task_arrays")
    submitter = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="task_arrays")
    name = models.CharField(max_length=200)
    spec = models.CharField(max_length=200, help_text='As submitted, e.g. "0-99%8".')
    size = models.PositiveIntegerField()
    throttle = models.PositiveIntegerField(default=0, help_text="Most elements running at once; 0: no limit.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["throttle"], name="taskarray_throttled_idx", condition=Q(throttle__gt=0))]

    def __str__(self) -> str:
        return f"array #{self.pk} {self.name} [{self.spec}]"


class TaskDependency(models.Model):
    """``task`` may start only once ``depends_on`` ended as ``kind`` asks (see scheduling.dependencies)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="dependencies")
    depends_on = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="dependents")
    kind = models.CharField(max_length=12, choices=[("after_ok", "after ok"), ("after_any", "after any"),
                                                    ("after_not_ok", "after not ok")])

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "depends_on", "kind"], name="taskdependency_unique"),
            models.CheckConstraint(condition=~Q(task=F("depends_on")), name="taskdependency_not_on_itself"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} {self.kind} {self.depends_on_id}"


class TaskRank(models.Model):
    """One server's part of a gang's attempt: written with the placement, filled in by its agent.

    The start barrier: every rank reports ``ready`` (rank 0 with its address and a free port),
    then the task's ``master_addr``/``master_port`` are set and every agent starts its process.
    """

    # Neither key has an index of its own: taskrank_one_per_rank (task, attempt, rank) and
    # taskrank_node_idx (node, attempt) lead with them.
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="ranks", db_index=False)
    attempt = models.PositiveIntegerField()
    rank = models.PositiveSmallIntegerField()
    node = models.ForeignKey("nodes.Node", on_delete=models.PROTECT, related_name="task_ranks", db_index=False)
    address = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["task", "attempt", "rank"]
        indexes = [models.Index(fields=["node", "attempt"], name="taskrank_node_idx")]
        constraints = [
            models.UniqueConstraint(fields=["task", "attempt", "rank"], name="taskrank_one_per_rank"),
            models.UniqueConstraint(fields=["task", "attempt", "node"], name="taskrank_one_per_server"),
        ]

    def __str__(self) -> str:
        return f"task {self.task_id} attempt {self.attempt} rank {self.rank}"
class AllocationInterval(models.Func):
    """``tstzrange(allocated_at, released_at)``, half-open; an active allocation runs to infinity."""

    function = "TSTZRANGE"
    output_field = DateTimeRangeField()


class GpuClaim(models.Func):
    """What an allocation claims of its GPU, as a range of numbers: an exclusive one all of it,
    ``(,)``; a shared one only its own ``[id, id]``. Two claims overlap unless both are shared."""

    output_field = BigIntegerRangeField()
    arity = 2  # (exclusive, pk)

    def as_sql(self, compiler, connection, **extra):
        (exclusive, exclusive_params), (pk, pk_params) = (compiler.compile(e) for e in self.get_source_expressions())
        return (f"(CASE WHEN {exclusive} THEN int8range(NULL, NULL) ELSE int8range({pk}, {pk}, '[]') END)",
                [*exclusive_params, *pk_params, *pk_params])


class ClockTimestamp(models.Func):
    """The database's clock now (not the statement's or transaction's start): an interval
    opened after another closed starts after it, whoever waited for which lock."""

    template = "clock_timestamp()"
    output_field = models.DateTimeField()


class Allocation(models.Model):
    """A task's claim on one GPU. Active while ``released_at`` is null.

    ``[allocated_at, released_at)`` is the interval the GPU was held, in database time
    (both ends are set by PostgreSQL's clock, never a process's): usage accounting
    sums these, so the database refuses overlapping exclusive ones.
    """

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="allocations")
    # The database checks both keys as one: allocation_gpu_on_its_server below.
    gpu = models.ForeignKey("nodes.GPU", on_delete=models.PROTECT, related_name="allocations", db_constraint=False)
    node = models.ForeignKey("nodes.Node", on_delete=models.PROTECT, related_name="allocations",
                             verbose_name=_("server"), db_constraint=False)
    memory_mb = models.PositiveIntegerField()
    exclusive = models.BooleanField(default=True)
    allocated_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("allocation")
        verbose_name_plural = _("allocations")
        indexes = [
            models.Index(fields=["gpu"], name="allocation_active_gpu_idx", condition=Q(released_at__isnull=True)),
            models.Index(fields=["node"], name="allocation_active_node_idx", condition=Q(released_at__isnull=True)),
            # The usage ledger reads intervals released after its roll-up watermark raw.
            models.Index(fields=["released_at"], name="allocation_released_idx",
                         condition=Q(released_at__isnull=False)),
        ]
        constraints = [
            # The last line of defence: an exclusive task has its GPU to itself, now and in the
            # history usage sums. Two allocations of one GPU whose intervals overlap must both be
            # shared: so never two active exclusive ones, never an exclusive one beside shared
            # ones, and no exclusive interval overlapping another. One GiST index does all three
            # (it was a unique index and two GiSTs: 22.6 -> 17.1 ms for a pass's 1,600 rows).
            ExclusionConstraint(
                name="allocation_exclusive_overlaps_nothing",
                expressions=[("gpu", RangeOperators.EQUAL),
                             (AllocationInterval("allocated_at", "released_at"), RangeOperators.OVERLAPS),
                             (GpuClaim("exclusive", "id"), RangeOperators.OVERLAPS)],
            ),
            models.UniqueConstraint(
                fields=["task", "gpu"], condition=Q(released_at__isnull=True),
                name="allocation_one_active_per_task_gpu",
            ),
            # The GPU exists and the allocation's server is its server (and so exists too):
            # one check per row where a key on each column cost two, ~5 ms of the ~43 ms that
            # PostgreSQL spends writing a pass's 1,600 allocations with their tasks and events.
            CompositeForeignKey(fields=["gpu", "node"], to="nodes.GPU", to_fields=["id", "node"],
                                name="allocation_gpu_on_its_server"),
            models.CheckConstraint(
                condition=Q(released_at__isnull=True) | Q(released_at__gte=F("allocated_at")),
                name="allocation_released_after_allocated",
            ),
        ]

    def __str__(self) -> str:
        return f"task {self.task_id} on GPU {self.gpu_id}"

    @property
    def active(self) -> bool:
        return self.released_at is None


class PendingBound(models.Model):
    """An upper bound on a tenant's pending tasks, so that a submit checks the pending limit
    without counting the queue while the bound leaves room (``lifecycle.submit_many``).

    The bound is ``bound`` plus the tenant's ``PendingBoundRaise`` rows. Both are kept by the
    database (scheduling migration 0015): a row at 0 is made with each tenant, and every task
    inserted pending or moved (back) to pending adds a raise in the same transaction, whoever
    writes it (the API, a pass's preemptions, the sweep, an agent's report, the admin, raw
    SQL). Nothing lowers the bound when a task leaves the queue. Only submits, which hold the
    tenant's quota row, write ``bound``: each folds the raises it sees into it, and one whose
    bound would pass the limit counts the pending tasks and sets the bound to that count.
    So a move into the queue only ever inserts a row and never waits for (or deadlocks with)
    a submit or another move. A tenant without a row is always counted.
    """

    # The database's own key deletes the row with its tenant, however the tenant is deleted
    # (scheduling migration 0015: ON DELETE CASCADE, which Django cannot declare).
    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, primary_key=True, related_name="+",
                                  db_constraint=False)
    bound = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"tenant {self.tenant_id}: at most {self.bound} pending, with its raises"


class PendingBoundRaise(models.Model):
    """``n`` more tasks entered a tenant's queue: part of its ``PendingBound`` until a submit folds it in."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+", db_constraint=False)
    n = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"tenant {self.tenant_id}: +{self.n} pending"


class TaskEvent(models.Model):
    """One state change of a task: from, to, who or what did it, why, when."""

    # No index of its own: taskevent_task_time_idx (task, created_at) leads with it.
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events", db_index=False)
    from_status = models.CharField(max_length=10, choices=TaskStatus.choices, blank=True)
    to_status = models.CharField(max_length=10, choices=TaskStatus.choices)
    actor = models.CharField(max_length=100, help_text='"scheduler", "user:alice", "agent:gpu-01", "sweep"...')
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = _("task event")
        verbose_name_plural = _("task events")
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["task", "created_at"], name="taskevent_task_time_idx")]

    def __str__(self) -> str:
        return f"{self.task_id}: {self.from_status or '-'} -> {self.to_status}"


class TaskLogChunk(models.Model):
    """An increment of a task's stdout/stderr, shipped by its agent. ``offset`` is
    the byte offset in the agent's log file, so a retried chunk is stored once."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="log_chunks")
    attempt = models.PositiveIntegerField(default=0)
    rank = models.PositiveSmallIntegerField(default=0)  # a gang's server; 0 for a one-server task
    offset = models.PositiveBigIntegerField()
    data = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = _("task log chunk")
        verbose_name_plural = _("task log chunks")
        ordering = ["task", "attempt", "rank", "offset"]
        constraints = [
            models.UniqueConstraint(fields=["task", "attempt", "rank", "offset"], name="tasklogchunk_unique_offset"),
        ]

    def __str__(self) -> str:
        return f"task {self.task_id} attempt {self.attempt} @{self.offset}"


class ModelMemoryEstimate(models.Model):
    """Remembered GPU memory need per model, raised after an out-of-memory failure."""

    model_name = models.CharField(max_length=200, unique=True)
    memory_mb = models.PositiveIntegerField()
    oom_count = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = _("model memory estimate")
        verbose_name_plural = _("model memory estimates")

    def __str__(self) -> str:
        return f"{self.model_name}: {self.memory_mb} MB"


class SchedulerLock(models.Model):
    """The cluster-wide scheduler lock: one row, locked with SELECT ... FOR UPDATE
    for the length of a pass. The lock dies with the holder's connection."""

    name = models.CharField(max_length=50, unique=True)
    holder = models.CharField(max_length=200, blank=True)
    acquired_at = models.DateTimeField(null=True, blank=True)
    # Used on the separate "wake" row (never on the locked "scheduler" row, so that
    # flipping it never waits for a running pass): set by the first request_pass
    # after a pass started, cleared by the next pass as it starts. Only the request
    # that flips it enqueues a django-q pass, so a burst of submits queues one pass.
    pass_requested = models.BooleanField(default=False)
    requested_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


# --- usage accounting (scheduling.usage) ------------------------------------------------
# Tenant and user ids are kept without foreign-key constraints on purpose: the ledger is
# history, and a deleted user's GPU-hours must still add up in last year's report.


class UsageDay(models.Model):
    """Closed allocation intervals rolled up per UTC day (``scheduling.usage.roll_up``).

    Only intervals released at or before ``UsageRollup.watermark`` are in here, each split
    at midnight UTC; everything released later (or still open) is read raw. Keyed by the
    dimensions most reports group by, so a year is a few hundred thousand rows at most.
    """

    day = models.DateField()
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.DO_NOTHING, db_constraint=False,
                               related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING,
                             db_constraint=False, related_name="+")
    gpu_model = models.CharField(max_length=100)
    workload_class = models.CharField(max_length=10)
    gpu_seconds = models.FloatField(default=0)
    gpu_memory_mb_seconds = models.FloatField(default=0)
    # GPU-seconds for which the agents reported utilisation, and those weighted by it (0..1).
    measured_gpu_seconds = models.FloatField(default=0)
    busy_gpu_seconds = models.FloatField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["day", "tenant", "user", "gpu_model", "workload_class"],
                                    name="usageday_unique_key", nulls_distinct=False),
        ]

    def __str__(self) -> str:
        return f"{self.day} tenant {self.tenant_id} user {self.user_id}: {self.gpu_seconds / 3600:.1f} GPU-h"


class UsageRollup(models.Model):
    """The roll-up's progress: allocations released at or before ``watermark`` are in UsageDay."""

    name = models.CharField(max_length=50, unique=True)
    watermark = models.DateTimeField()
    rolled_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} up to {self.watermark}"


class GpuUtilisationDay(models.Model):
    """Utilisation samples of one GPU over one UTC day (sum and count: the mean is their ratio)."""

    gpu = models.ForeignKey("nodes.GPU", on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    day = models.DateField()
    samples = models.PositiveIntegerField(default=0)
    utilization_sum = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["gpu", "day"], name="gpuutilisationday_unique")]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} on {self.day}"


class GpuAllocationCount(models.Model):
    """How many allocations of one GPU were released at or before the usage watermark.

    Added to by ``scheduling.usage.roll_up`` in the transaction that moves the watermark, so
    a GPU's allocations ever are this plus its raw rows after the watermark (open, or released
    later: both found through partial indexes), never a count over the whole history
    (``scheduling.usage.allocations_per_gpu``; ``/metrics`` reads it on every scrape).
    """

    gpu = models.OneToOneField("nodes.GPU", on_delete=models.DO_NOTHING, db_constraint=False, primary_key=True,
                               related_name="+")
    allocations = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"GPU {self.gpu_id}: {self.allocations} allocations rolled up"


class Reservation(models.Model):
    """N GPUs booked for one tenant over [starts_at, ends_at), optionally repeated weekly.

    A tenant admin requests it; staff approve or reject it (or the tenant's
    ``ReservationPolicy`` approves it on the spot). Approval books concrete GPUs as
    ``ReservationSlot`` rows, one per GPU and occurrence, which the database keeps from
    overlapping (an exclusion constraint): two approved reservations never book one GPU
    for the same time. The rules live in ``scheduling.reservations``."""

    class State(models.TextChoices):
        REQUESTED = "requested", _("requested")
        APPROVED = "approved", _("approved")
        REJECTED = "rejected", _("rejected")
        RELEASED = "released", _("released")

    name = models.SlugField(_("name"), max_length=60, unique=True,
                            help_text=_("Short name tasks and the CLI use, e.g. paper-deadline."))
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="reservations",
                               verbose_name=_("tenant"))
    gpu_count = models.PositiveIntegerField(_("GPUs"))
    gpu_model = models.CharField(_("GPU model"), max_length=100, blank=True,
                                 help_text=_("Substring of the GPU model, e.g. H100."))
    node_selector = models.JSONField(_("server labels"), default=dict, blank=True,
                                     help_text=_("Labels the servers must carry."))
    nodes = models.ManyToManyField("nodes.Node", blank=True, related_name="reservations", verbose_name=_("servers"),
                                   help_text=_("Only these servers (empty: any)."))
    starts_at = models.DateTimeField(_("from"))
    ends_at = models.DateTimeField(_("until"))
    repeat_weeks = models.PositiveSmallIntegerField(_("weekly repeats"), default=0,
                                                    help_text=_("Further weekly occurrences (0: once)."))
    reason = models.CharField(_("reason"), max_length=500, blank=True)
    state = models.CharField(_("state"), max_length=10, choices=State.choices, default=State.REQUESTED)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="reservations_requested", verbose_name=_("requested by"))
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="reservations_decided", verbose_name=_("decided by"))
    decided_at = models.DateTimeField(_("decided at"), null=True, blank=True)
    decision_note = models.CharField(_("decision note"), max_length=500, blank=True)
    released_at = models.DateTimeField(_("released at"), null=True, blank=True)
    # The next window bound (an occurrence's start or end) the sweep wakes the scheduler for.
    next_bound_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["starts_at", "id"]
        verbose_name = _("reservation")
        verbose_name_plural = _("reservations")
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__gt=F("starts_at")), name="reservation_window_valid"),
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="reservation_gpu_count_positive"),
        ]
        indexes = [models.Index(fields=["next_bound_at"], name="reservation_next_bound_idx",
                                condition=Q(state="approved"))]

    def __str__(self) -> str:
        return self.name

    def occurrences(self) -> list[tuple]:
        """Every [start, end) window: the first and ``repeat_weeks`` weekly repeats."""
        from datetime import timedelta

        week = timedelta(weeks=1)
        return [(self.starts_at + k * week, self.ends_at + k * week) for k in range(self.repeat_weeks + 1)]

    @property
    def last_end(self):
        return self.occurrences()[-1][1]

    def gpu_hours(self) -> float:
        return self.gpu_count * sum((e - s).total_seconds() for s, e in self.occurrences()) / 3600


class ReservationSlot(models.Model):
    """One booked GPU for one occurrence of an approved reservation."""

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="slots")
    gpu = models.ForeignKey("nodes.GPU", on_delete=models.CASCADE, related_name="reservation_slots")
    period = DateTimeRangeField()

    class Meta:
        constraints = [
            ExclusionConstraint(
                name="reservation_slot_no_double_booking",
                expressions=[("gpu", RangeOperators.EQUAL), ("period", RangeOperators.OVERLAPS)],
            ),
        ]
        indexes = [models.Index(fields=["reservation"], name="reservation_slot_res_idx")]

    def __str__(self) -> str:
        return f"{self.reservation} on GPU {self.gpu_id}"


class ReservationPolicy(models.Model):
    """Per tenant: requests are approved on the spot while the tenant's approved reservations
    in the coming week (this one included) stay within ``auto_approve_gpu_hours_per_week``."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="reservation_policy",
                                  verbose_name=_("tenant"))
    auto_approve_gpu_hours_per_week = models.PositiveIntegerField(
        _("GPU-hours a week approved on the spot"), default=0,
        help_text=_("GPU-hours a week ahead approved without staff (0: staff approve every request)."))

    class Meta:
        verbose_name = _("reservation policy")
        verbose_name_plural = _("reservation policies")

    def __str__(self) -> str:
        return f"reservation policy of {self.tenant}"


# The audit (issue 11) of plans: who requested, approved, rejected or released a booking and
# who changed a tenant's booking policy, with old -> new values (django-pghistory triggers,
# whoever makes the change; who and through what is in portal.audit). Fresh trackers per model.
pghistory.track(pghistory.InsertEvent(), pghistory.UpdateEvent(), pghistory.DeleteEvent())(Reservation)
pghistory.track(pghistory.InsertEvent(), pghistory.UpdateEvent(), pghistory.DeleteEvent())(ReservationPolicy)
