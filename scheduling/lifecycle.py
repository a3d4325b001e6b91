"""Every change of a task's state, and who must hear of it.

Each transition is a row of ``MOVES``: the states it may start from, the
states it may end in (every such edge is also one ``choices.TRANSITIONS`` allows,
which the Task model enforces on every write), whether the agents of the task's servers are told (they
start or kill processes), whether the scheduler is woken (GPUs were freed or a
task joined the queue) and which operator alert it raises. The functions below
lock the task row, check the move against its row (``IllegalTransition`` if it
does not fit), change state, allocations and the ``TaskEvent`` in one
transaction, and collect what must be told in a ``FanOut``. ``_fan_out`` is the
one place that hands a ``FanOut`` to the live pushes, the scheduler wake-up and
the alerts, each of which sends only after commit.

Bulk callers (the pass, the sweep, submission) pass one ``FanOut`` through many
transitions (``batch()``): a pass that places thousands of tasks pushes once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import F, Max
from django.db.models.sql import InsertQuery
from django.utils import timezone

from kernel import counters, live, pgarrays
from kernel.alerts import raise_alert
from kernel.models import Alert
from kernel.pipelined import Pipelined
from kernel.prepared import prepared_cursor
from nodes.models import GPU, remember_models
from scheduling import triggers
from scheduling.choices import TaskStatus
from scheduling.models import InvalidTransition, ModelMemoryEstimate, Task, TaskEvent, TaskRank
from tenants.choices import Priority

P, A, R = TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.RUNNING
HELD = frozenset({A, R})  # a task holding GPUs on servers whose agents run it


class Move(StrEnum):
    SUBMIT = "submit"
    PLACE = "place"
    START = "start"
    FINISH = "finish"  # the process ended: succeeded, or failed with its exit code
    OOM = "oom"  # out of GPU memory: retried with more, or failed when retries are spent
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    REQUEUE = "requeue"  # an operator sent it back to the queue
    PREEMPT = "preempt"
    LOSE = "lose"  # its process or server is gone, or it never started: retried while retries remain
    REPRIORITISE = "reprioritise"  # not a state change, but an event, and the queue order changes


@dataclass(frozen=True)
class Rule:
    sources: frozenset[str]
    targets: frozenset[str]
    tell_agents: bool  # assignments and GPU cells of the servers the task held
    wake_from: frozenset[str]  # wake the scheduler when the task left one of these
    alert: str = ""  # the Alert kind raised
    keeps_status: bool = False  # an event without a change of state (ends where it started)


_RETRY = frozenset({P, TaskStatus.FAILED})  # back to the queue, or failed with no retries left

MOVES: dict[Move, Rule] = {
    Move.SUBMIT: Rule(frozenset({""}), frozenset({P}), tell_agents=False, wake_from=frozenset({""})),
    Move.PLACE: Rule(frozenset({P}), frozenset({A}), tell_agents=True, wake_from=frozenset()),
    Move.START: Rule(frozenset({A}), frozenset({R}), tell_agents=False, wake_from=frozenset()),
    Move.FINISH: Rule(HELD, frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED}), tell_agents=True, wake_from=HELD),
    Move.OOM: Rule(HELD, _RETRY, tell_agents=True, wake_from=HELD, alert=Alert.Kind.TASK_OOM),
    Move.TIME_OUT: Rule(HELD, frozenset({TaskStatus.TIMED_OUT}), tell_agents=True, wake_from=HELD),
    Move.CANCEL: Rule(frozenset({P, A, R}), frozenset({TaskStatus.CANCELLED}), tell_agents=True, wake_from=HELD),
    Move.REQUEUE: Rule(HELD, _RETRY, tell_agents=True, wake_from=HELD),
    Move.PREEMPT: Rule(HELD, _RETRY, tell_agents=True, wake_from=HELD),
    Move.LOSE: Rule(HELD, _RETRY, tell_agents=True, wake_from=HELD),
    Move.REPRIORITISE: Rule(frozenset({P, A, R}), frozenset({P, A, R}), tell_agents=False, wake_from=frozenset({P}),
                            keeps_status=True),
}


class IllegalTransition(InvalidTransition):
    """A move the table does not allow from the task's state (a bug in the caller)."""


@dataclass
class FanOut:
    """What the transitions of one transaction must tell once it commits."""

    tasks: set[tuple[int, int]] = field(default_factory=set)  # (tenant_id, task_id): pages
    agents: set[int] = field(default_factory=set)  # servers whose assignments changed (and GPU cells)
    gpus: set[int] = field(default_factory=set)  # servers whose GPU cells changed, agents not concerned
    wakes: list[str] = field(default_factory=list)  # why the scheduler should run (empty: it need not)
    alerts: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def task_changed(self, tenant_id: int, task_id: int) -> None:
        """A task's page row changed without a transition (a gang rank's report, a pending reason)."""
        self.tasks.add((tenant_id, task_id))

    def request_pass(self, reason: str) -> None:
        self.wakes.append(reason)

    def wake_as(self, reason: str) -> None:
        """One wake-up that names the whole batch, instead of its transitions one by one."""
        self.wakes = [reason]

    def alert(self, kind: str, message: str, **kwargs: Any) -> None:
        self.alerts.append((kind, message, kwargs))

    def __bool__(self) -> bool:
        return bool(self.tasks or self.agents or self.gpus or self.wakes or self.alerts)


def _fan_out(fan: FanOut) -> None:
    """The one place a transition's news leaves lifecycle. Called inside the transaction:
    an alert's row is part of it, and each push and the wake-up are sent after commit
    (``live`` and ``triggers`` queue them on ``transaction.on_commit``)."""
    for kind, message, kwargs in fan.alerts:
        raise_alert(kind, message, **kwargs)
    if fan.agents:
        live.assignments_changed(fan.agents)
    if fan.agents or fan.gpus:
        live.gpus_changed(fan.agents | fan.gpus)
    if fan.tasks:
        live.tasks_changed(fan.tasks)
    if fan.wakes:
        more = f" (+{len(fan.wakes) - 1} more)" if len(fan.wakes) > 1 else ""
        triggers.request_pass(fan.wakes[0] + more)


@contextmanager
def batch(fan: FanOut | None = None) -> Iterator[FanOut]:
    """Collect the fan-out of the transitions made inside; hand it on once at the end
    (call inside the transaction). Given an outer ``fan``, add to it and let its own
    batch hand it on. Nothing is handed on when the block raises."""
    if fan is not None:
        yield fan
        return
    fan = FanOut()
    yield fan
    _fan_out(fan)


def _apply(task: Task, move: Move, fan: FanOut, change: Callable[[], TaskEvent], *,
           alert: tuple[str, dict[str, Any]] | None = None) -> TaskEvent:
    """Make ``change`` (a Task state-machine method writing the event) as ``move`` and note its fan-out."""
    rule = MOVES[move]
    before = task.status
    if before not in rule.sources:
        raise IllegalTransition(f"task {task.pk}: {move} is not allowed from {before}")
    # Before the change: a requeue forgets the task's servers, and those agents must stop it.
    servers = task.node_ids() if rule.tell_agents and before in HELD else []
    event = change()
    if event.to_status not in rule.targets or (rule.keeps_status and event.to_status != before):
        raise IllegalTransition(f"task {task.pk}: {move} may not end in {event.to_status}")
    fan.tasks.add((task.tenant_id, task.pk))
    fan.agents.update(servers)
    if before in rule.wake_from:
        fan.request_pass(f"task {task.pk}: {move}")
    if rule.alert:
        message, kwargs = alert or (f"task #{task.pk} {task.name}: {move}", {})
        fan.alert(rule.alert, message, task=task, **kwargs)
    return event


# --- transitions of a task whose row the caller has locked -------------------------------

def requeue(task: Task, *, actor: str, reason: str, fan: FanOut, move: Move = Move.LOSE) -> TaskEvent:
    """Back to pending with one more attempt (failed once retries are spent); its agents stop it."""
    return _apply(task, move, fan, lambda: task.requeue(actor=actor, reason=reason))


def time_out(task: Task, *, actor: str, fan: FanOut, exit_code: int | None = None, reason: str = "") -> TaskEvent:
    return _apply(task, Move.TIME_OUT, fan,
                  lambda: task.finish(exit_code=exit_code, actor=actor, reason=reason, timed_out=True))


def finish(task: Task, *, exit_code: int | None, actor: str, fan: FanOut, reason: str = "") -> TaskEvent:
    return _apply(task, Move.FINISH, fan, lambda: task.finish(exit_code=exit_code, actor=actor, reason=reason))


def _start(task: Task, *, actor: str, reason: str, fan: FanOut) -> TaskEvent:
    event = _apply(task, Move.START, fan, lambda: task.transition(R, actor=actor, reason=reason))
    _remember_model(task)
    return event


def _remember_model(task: Task) -> None:
    """The task's model is now loaded on its GPUs: the model-affinity score will prefer them."""
    if task.model_name:
        gpu_ids = task.allocations.filter(released_at__isnull=True).values_list("gpu_id", flat=True)
        remember_models({gpu_id: [task.model_name] for gpu_id in gpu_ids})


def _my_rank(task: Task, node_id: int) -> TaskRank:
    """This server's rank of the gang's current attempt (the task row is locked: so is this)."""
    rank = task.ranks.filter(attempt=task.attempt, node_id=node_id).first()
    if rank is None:
        raise PermissionError(f"task {task.pk} is not assigned to this server")
    return rank


# --- reports from agents, users and operators (each locks the task itself) ---------------

def report_ready(task_id: int, *, node_id: int, actor: str, attempt: int, address: str = "",
                 port: int | None = None, rank: int | None = None) -> Task:
    """A gang's rank reached the start barrier. Once every rank is ready, rank 0's address and
    port become the gang's MASTER_ADDR/MASTER_PORT and every agent is told to start its process."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if not task.is_gang:
            raise PermissionError(f"task {task_id} is not a gang")
        if attempt != task.attempt:
            return task
        mine = _my_rank(task, node_id)
        if task.status != A or mine.ready_at is not None:
            return task
        if mine.rank == 0 and (not address or port is None):
            raise ValueError("rank 0 must report its address and port")
        mine.ready_at, mine.address, mine.port = timezone.now(), address[:255], port
        mine.save(update_fields=["ready_at", "address", "port"])
        ranks = task.current_ranks()
        if all(r.ready_at is not None for r in ranks):
            task.master_addr, task.master_port = ranks[0].address, ranks[0].port
            task.save(update_fields=["master_addr", "master_port", "updated_at"])
            fan.task_changed(task.tenant_id, task.pk)
            fan.agents.update(r.node_id for r in ranks)  # start now, with the master address
        return task


def report_started(task_id: int, *, node_id: int, actor: str, attempt: int | None = None,
                   rank: int | None = None) -> Task:
    """The agent started the task's process. Idempotent: a repeat changes nothing,
    and so does a report about an earlier ``attempt`` than the task's current one.
    A gang runs once every rank has started."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if task.is_gang:
            if attempt is None or attempt == task.attempt:
                mine = _my_rank(task, node_id)
                if mine.started_at is None:
                    mine.started_at = timezone.now()
                    mine.save(update_fields=["started_at"])
                ranks = task.current_ranks()
                if task.status == A and all(r.started_at is not None for r in ranks):
                    _start(task, actor=actor, reason=f"all {len(ranks)} ranks started", fan=fan)
            return task
        if task.node_id != node_id:
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if attempt is not None and attempt != task.attempt:
            return task
        if task.status == A:
            _start(task, actor=actor, reason="process started", fan=fan)
        return task


def record_oom(task: Task) -> ModelMemoryEstimate | None:
    """Raise the remembered memory estimate of the task's model by the OOM factor."""
    if not task.model_name:
        return None
    factor = settings.SCHEDULER.oom_memory_factor
    held = task.allocations.filter(released_at__isnull=True).values_list("memory_mb", flat=True)
    current = max([task.gpu_memory_mb or 0, *held])
    estimate, created = ModelMemoryEstimate.objects.select_for_update().get_or_create(
        model_name=task.model_name, defaults={"memory_mb": max(int(current * factor), 1), "oom_count": 1}
    )
    if not created:
        base = max(estimate.memory_mb, current)
        estimate.memory_mb = int(base * factor)
        estimate.oom_count = F("oom_count") + 1
        estimate.save(update_fields=["memory_mb", "oom_count", "updated_at"])
        estimate.refresh_from_db()
    return estimate


def _retry_memory_mb(task: Task, estimate: ModelMemoryEstimate | None) -> int | None:
    """What the next attempt asks for per GPU: the model's raised estimate, else the
    task's own request raised by the OOM factor (never past what a GPU can hold: the
    largest GPU less the safety margin, as submission's ClusterLimits.max_task_memory_mb);
    a whole-GPU task stays whole."""
    if estimate is not None:
        return estimate.memory_mb
    if task.gpu_memory_mb is None:
        return None
    config = settings.SCHEDULER
    largest = GPU.objects.aggregate(m=Max("memory_total_mb"))["m"] or 0
    raised = int(task.gpu_memory_mb * config.oom_memory_factor)
    return max(min(raised, max(largest - config.memory_safety_margin_mb, 0)), task.gpu_memory_mb)


def _oom(task: Task, *, node_id: int, actor: str, reason: str, exit_code: int | None, fan: FanOut) -> None:
    """Raise the model's estimate; retry with more memory while retries remain, else fail."""
    estimate = record_oom(task)
    task.oom = True
    final = task.attempt >= task.max_retries
    retry = (f"requeued (retry {task.attempt + 1} of {task.max_retries})" if not final
             else "failed: no retries left")
    raised = f"; {task.model_name} now needs {estimate.memory_mb} MB" if estimate else ""
    # The final OOM is news even while an earlier OOM alert of this task is still open.
    alert = (f"task #{task.pk} {task.name} ran out of GPU memory{raised}; {retry}", {"node": node_id, "repeat": final})
    # Say it was an OOM whatever else the agent saw (an exit code is not the story).
    why = f"CUDA out of memory ({reason})" if reason and "out of memory" not in reason else (
        reason or "CUDA out of memory")
    if final:
        _apply(task, Move.OOM, fan, lambda: task.finish(exit_code=exit_code, oom=True, actor=actor, reason=why),
               alert=alert)
        return
    # The next try asks for more than the size that failed, and the task shows how much.
    task.gpu_memory_mb = _retry_memory_mb(task, estimate)
    task.failure_reason = why[:500]
    more = f"; retrying with {task.gpu_memory_mb} MB per GPU" if task.gpu_memory_mb else ""
    _apply(task, Move.OOM, fan, lambda: task.requeue(actor=actor, reason=why + more), alert=alert)
    task.save(update_fields=["oom", "gpu_memory_mb", "failure_reason"])


def _gang_finished(task: Task, node_id: int, *, exit_code: int | None, actor: str, oom: bool, reason: str,
                   timed_out: bool, fan: FanOut) -> bool:
    """One rank ended. Success waits for every rank; anything else ends the whole gang:
    its other ranks are stopped by their agents when the portal stops assigning them.
    Returns True when the caller should go on to end the task the one-server way."""
    mine = _my_rank(task, node_id)
    mine.exit_code, mine.finished_at = exit_code, timezone.now()
    mine.save(update_fields=["exit_code", "finished_at"])
    where = f"rank {mine.rank} on {mine.node.name}"
    if exit_code == 0 and not oom and not timed_out:
        if all(r.exit_code == 0 for r in task.current_ranks()):
            finish(task, exit_code=0, actor=actor, fan=fan)
        return False
    if oom or timed_out:
        return True
    if exit_code is None or exit_code < 0 or exit_code > 128:
        # Killed by a signal or lost: the infrastructure, not the program; run it again.
        how = f"killed by signal {abs(exit_code) % 128 or 9}" if exit_code is not None else "lost"
        requeue(task, actor=actor, fan=fan,
                reason=f"{where} {how}{'; ' + reason if reason else ''}; every rank was stopped")
    else:
        finish(task, exit_code=exit_code, actor=actor, fan=fan,
               reason=f"{where} failed: {reason or f'exit code {exit_code}'}; every rank was stopped")
    return False


def report_finished(task_id: int, *, node_id: int, exit_code: int | None, actor: str, oom: bool = False,
                    reason: str = "", timed_out: bool = False, attempt: int | None = None,
                    rank: int | None = None) -> Task:
    """The agent saw the process exit. An OOM raises the model's estimate and retries
    while retries remain; ``timed_out`` means the agent killed it at its timeout.
    Idempotent: a report for a task already final, or for an earlier ``attempt``
    (the task was requeued meanwhile), changes nothing."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if not task.runs_on(node_id):
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if task.is_final or task.status == P:
            return task
        if attempt is not None and attempt != task.attempt:
            return task
        if task.is_gang and not _gang_finished(task, node_id, exit_code=exit_code, actor=actor, oom=oom,
                                               reason=reason, timed_out=timed_out, fan=fan):
            return task
        if oom:
            _oom(task, node_id=node_id, actor=actor, reason=reason, exit_code=exit_code, fan=fan)
        elif timed_out:
            time_out(task, exit_code=exit_code, actor=actor, reason=reason, fan=fan)
        else:
            finish(task, exit_code=exit_code, actor=actor, reason=reason, fan=fan)
        return task


def report_lost(task_id: int, *, node_id: int, actor: str, reason: str, attempt: int | None = None,
                rank: int | None = None) -> Task:
    """The agent no longer knows the task's process (it restarted without it): the
    task goes back to pending while it has retries left, like a lost server's. A gang
    is requeued whole when any of its ranks is lost."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if not task.runs_on(node_id):
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if not task.is_active or (attempt is not None and attempt != task.attempt):
            return task
        if task.is_gang:
            mine = _my_rank(task, node_id)
            reason = f"rank {mine.rank} on {mine.node.name} lost: {reason}; every rank was stopped"
        requeue(task, actor=actor, reason=reason, fan=fan)
        return task


def cancel(task_id: int, *, actor: str, reason: str = "cancelled", fan: FanOut | None = None) -> Task:
    """Cancel a task in any non-final state; a running process is killed by its agent."""
    with transaction.atomic(), batch(fan) as fan:
        task = Task.locked(task_id)
        if not task.is_final:
            _apply(task, Move.CANCEL, fan, lambda: task.cancel(actor=actor, reason=reason))
        return task


def operator_requeue(task_id: int, *, actor: str, reason: str) -> Task | None:
    """An operator sends an assigned or running task back to the queue, even with its
    retries spent. None when the task is not assigned or running (left as it is)."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if not task.is_active:  # pending is already queued; final tasks are history
            return None
        if task.attempt >= task.max_retries:
            task.max_retries = task.attempt + 1
            task.save(update_fields=["max_retries"])
        requeue(task, actor=actor, reason=reason, fan=fan, move=Move.REQUEUE)
        return task


def reprioritise(task_id: int, priority: Priority, *, actor: str) -> Task | None:
    """Give a task that is not final another priority; None when nothing changed."""
    with transaction.atomic(), batch() as fan:
        task = Task.locked(task_id)
        if task.is_final or task.priority == priority:
            return None
        before = Priority(task.priority).label

        def change() -> TaskEvent:
            task.priority = priority
            task.save(update_fields=["priority", "updated_at"])
            return TaskEvent.objects.create(task=task, from_status=task.status, to_status=task.status, actor=actor,
                                            reason=f"priority {before} -> {priority.label}")

        _apply(task, Move.REPRIORITISE, fan, change)
        return task


# --- bulk transitions: the pass and submission write many rows in one statement ----------

def _bulk_fan_out(move: Move, tasks: Iterable[tuple[int, int]], servers: Iterable[int], fan: FanOut,
                  reason: str) -> None:
    rule = MOVES[move]
    tasks = list(tasks)
    fan.tasks.update(tasks)
    if rule.tell_agents:
        fan.agents.update(servers)
    if tasks and rule.sources & rule.wake_from:
        fan.request_pass(reason)


# The tasks' INSERT (compiled by Django from the model, so every field and default
# is the ORM's), their "submitted" events and each tenant's pending count for its limit,
# in one statement: one round trip for any number of tasks.
#
# The count (models.PendingBound): the tenant's bound, with the raises this statement sees
# folded into it; when that leaves no room for the new tasks, the pending tasks counted up to
# the limit + 1 instead (by a function, so that the statement's generic plan is kept: migration
# scheduling/0017), which becomes the bound. The insert's own trigger then raises it by
# the new tasks. Raises committed after this statement began are not deleted by it, and their
# tasks are not in its count: they stay, for the next submit to fold.
_INSERT_WITH_EVENTS = """
WITH new_task AS ({insert} RETURNING id),
event AS (
    INSERT INTO scheduling_taskevent (task_id, from_status, to_status, actor, reason, created_at)
    SELECT id, '', %s, %s, 'submitted', %s FROM new_task
),
folded AS (
    DELETE FROM scheduling_pendingboundraise r WHERE r.tenant_id {in_tenants} RETURNING r.tenant_id, r.n
),
pending AS (
    SELECT q.tenant_id, s.bound, CASE WHEN s.bound + q.wanted <= q.lim THEN NULL
                                      ELSE scheduling_count_tasks_up_to(q.tenant_id, %s, q.lim + 1) END AS counted
    FROM {tenants} AS q(tenant_id, lim, wanted)
    LEFT JOIN LATERAL (
        SELECT b.bound + coalesce((SELECT sum(f.n) FROM folded f WHERE f.tenant_id = q.tenant_id), 0) AS bound
        FROM scheduling_pendingbound b WHERE b.tenant_id = q.tenant_id
    ) AS s ON true
),
settled AS (
    UPDATE scheduling_pendingbound b SET bound = coalesce(p.counted, p.bound)
    FROM pending p WHERE b.tenant_id = p.tenant_id
)
SELECT id, NULL, NULL FROM new_task
UNION ALL
SELECT NULL, tenant_id, coalesce(counted, bound) FROM pending
"""


_INSERT_FIELDS = [f for f in Task._meta.concrete_fields if not f.primary_key and not f.generated]
# The INSERT of one task as Django compiled it the first time, per database alias: compiling
# it cost a twentieth of a submit's CPU, and its text is the same for every task whose fields
# hold plain values (one holding an SQL expression is compiled afresh).
_ONE_TASK_INSERT: dict[str, str] = {}


def _task_insert(tasks: list[Task]) -> tuple[str, list[Any]]:
    """The ORM's INSERT of ``tasks`` (every field, default and ``auto_now`` as Django sets them)
    and its parameters."""
    db = connections[DEFAULT_DB_ALIAS]  # the wrapper, not the proxy: the compiler reads it often
    query = InsertQuery(Task)
    query.insert_values(_INSERT_FIELDS, tasks)
    compiler = query.get_compiler(connection=db)
    plain = len(tasks) == 1 and not any(
        hasattr(getattr(tasks[0], f.attname), "resolve_expression") for f in _INSERT_FIELDS)
    if plain and db.alias in _ONE_TASK_INSERT:
        return _ONE_TASK_INSERT[db.alias], [
            compiler.prepare_value(f, compiler.pre_save_val(f, tasks[0])) for f in _INSERT_FIELDS]
    (insert, params), = compiler.as_sql()
    if plain:
        _ONE_TASK_INSERT[db.alias] = insert
    return insert, params


def submit_many(tasks: list[Task], *, actor: str, limits: dict[int, int], fan: FanOut) -> dict[int, int]:
    """Insert pending ``tasks`` (setting their ids) with their "submitted" events; returns
    the tenants' pending-task counts from before the insert, each counted up to its limit + 1,
    or, where it leaves room for these tasks within the limit, a bound on it
    (``models.PendingBound``). The caller holds the tenants' quota rows, so concurrent
    submitters of a tenant take turns (the limit holds exactly, and they alone write the bound)."""
    if any(t.status != P for t in tasks):
        raise IllegalTransition(f"{Move.SUBMIT} makes pending tasks only")
    insert, params = _task_insert(tasks)
    tenant_ids = sorted(limits)
    wanted = Counter(task.tenant_id for task in tasks)
    # One task's statement is the same text every time: prepared. A batch's grows with its size,
    # and each size kept prepared would hold another large plan on the server: bound as Django binds.
    if len(tenant_ids) == 1:
        # Scalars, not arrays of one: planned for an array it does not know, PostgreSQL
        # estimates ten tenants, so the prepared statement's generic plan never looked
        # cheaper and every submit was planned afresh.
        sql = _INSERT_WITH_EVENTS.format(insert=insert, in_tenants="= %s",
                                         tenants="(VALUES (%s::bigint, %s::bigint, %s::bigint))")
        (tenant_id,) = tenant_ids
        tenants = [tenant_id, P, tenant_id, limits[tenant_id], wanted[tenant_id]]
    else:
        sql = _INSERT_WITH_EVENTS.format(insert=insert, in_tenants="= ANY(%s::bigint[])",
                                         tenants="unnest(%s::bigint[], %s::bigint[], %s::bigint[])")
        tenants = [tenant_ids, P, tenant_ids, [limits[t] for t in tenant_ids], [wanted[t] for t in tenant_ids]]
    with prepared_cursor() if len(tasks) == 1 else connection.cursor() as cursor:
        cursor.execute(sql, [*params, P, actor, timezone.now(), *tenants])
        rows = cursor.fetchall()
    ids = [task_id for task_id, _, _ in rows if task_id is not None]
    for task, task_id in zip(tasks, ids, strict=True):
        task.pk = task_id
        task._state.adding, task._state.db = False, connection.alias
    _bulk_fan_out(Move.SUBMIT, ((t.tenant_id, t.pk) for t in tasks), (), fan, "submit")
    return {tenant_id: n for task_id, tenant_id, n in rows if task_id is None}


@dataclass(frozen=True)
class Placing:
    """One task the pass places: its GPUs as (gpu_id, node_id) and, for a gang, its ranks' servers."""

    task_id: int
    tenant_id: int
    node_id: int
    reason: str
    memory_mb: int
    exclusive: bool
    gpus: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...] = ()


# All of a plan's placements in one statement. The UPDATE is the check: it only takes
# tasks still pending (a user may have cancelled one since the snapshot; lifecycle locks
# task rows, not the scheduler lock), and allocations, events and a gang's ranks (for the
# attempt it is in) are written for the tasks it took. Passes serialise on the scheduler
# lock, so locking these task rows in any order cannot deadlock with another pass.
_PLACE_SQL = """
WITH placed AS (
    UPDATE scheduling_task t
    SET status = %(to)s, node_id = v.node_id, assigned_at = %(now)s, updated_at = %(now)s,
        pending_reason = '', queue_position = NULL
    FROM unnest(%(task)s::bigint[], %(task_node)s::bigint[]) AS v(id, node_id)
    WHERE t.id = v.id AND t.status = %(from)s
    RETURNING t.id, t.attempt, t.created_at
), ranks AS (
    INSERT INTO scheduling_taskrank (task_id, attempt, rank, node_id, address)
    SELECT r.task_id, p.attempt, r.rank, r.node_id, ''
    FROM unnest(%(r_task)s::bigint[], %(r_rank)s::integer[], %(r_node)s::bigint[]) AS r(task_id, rank, node_id)
    JOIN placed p ON p.id = r.task_id
), events AS (
    INSERT INTO scheduling_taskevent (task_id, from_status, to_status, actor, reason, created_at)
    SELECT e.task_id, %(from)s, %(to)s, %(actor)s, e.reason, %(now)s
    FROM unnest(%(task)s::bigint[], %(reason)s::text[]) AS e(task_id, reason)
    WHERE e.task_id IN (SELECT id FROM placed)
), allocations AS (
    -- clock_timestamp(), not the pass's start: a GPU released while this pass waited for
    -- the lock must not get an interval that begins before that release.
    INSERT INTO scheduling_allocation (task_id, gpu_id, node_id, memory_mb, exclusive, allocated_at)
    SELECT a.task_id, a.gpu_id, a.node_id, a.memory_mb, a.exclusive, clock_timestamp()
    FROM unnest(%(a_task)s::bigint[], %(a_gpu)s::bigint[], %(a_node)s::bigint[], %(a_mem)s::integer[],
                %(a_excl)s::boolean[]) AS a(task_id, gpu_id, node_id, memory_mb, exclusive)
    WHERE a.task_id IN (SELECT id FROM placed)
), waits AS (
    SELECT greatest(extract(epoch FROM %(now)s::timestamptz - created_at), 0)::float8 AS s FROM placed
), counted AS (
    -- /metrics's placements and queue waits, counted where they happen (kernel.counters).
    INSERT INTO portal_metriccounter AS c (name, labels, value, updated_at)
    SELECT k.name, k.labels, k.value, %(now)s
    FROM (
        SELECT %(c_placed)s AS name, '' AS labels, count(*)::float8 AS value FROM waits
        UNION ALL
        SELECT %(c_wait_sum)s, '', sum(s) FROM waits
        UNION ALL
        SELECT %(c_wait_bucket)s, b.label, count(w.s)::float8
        FROM unnest(%(wait_bounds)s::float8[], %(wait_labels)s::text[]) AS b(bound, label)
        LEFT JOIN waits w ON w.s <= b.bound
        GROUP BY b.label
    ) k
    WHERE EXISTS (SELECT FROM placed)
    ON CONFLICT (name, labels) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
)
SELECT id FROM placed
"""

# The counters' names and the queue-wait buckets, the same for every batch.
_COUNTER_PARAMS = {
    "c_placed": counters.PLACEMENTS, "c_wait_sum": counters.QUEUE_WAIT_SUM, "c_wait_bucket": counters.QUEUE_WAIT_BUCKET,
    "wait_bounds": pgarrays.ints(counters.QUEUE_WAIT_BUCKETS),  # whole seconds, cast to float8
    "wait_labels": pgarrays.texts([counters.bucket_label(b) for b in counters.QUEUE_WAIT_BUCKETS]),
}

def place_many(placing: list[Placing], *, actor: str, now: datetime, fan: FanOut) -> list[Placing]:
    """Assign pending tasks to their GPUs, in one statement; returns those it took (a task
    no longer pending is left out). Their servers' agents are told once, for all of them."""
    if not placing:
        return []
    with connection.cursor() as cursor:
        cursor.execute(_PLACE_SQL, _place_params(placing, actor=actor, now=now))
        taken = {row[0] for row in cursor.fetchall()}
    return _placed(placing, taken, fan)


def _place_params(placing: list[Placing], *, actor: str, now: datetime) -> dict[str, Any]:
    a_task, a_gpu, a_node, a_mem, a_excl = [], [], [], [], []
    r_task, r_rank, r_node = [], [], []
    for p in placing:
        for gpu_id, node_id in p.gpus:
            a_task.append(p.task_id)
            a_gpu.append(gpu_id)
            a_node.append(node_id)
            a_mem.append(p.memory_mb)
            a_excl.append(p.exclusive)
        for rank, node_id in enumerate(p.ranks):
            r_task.append(p.task_id)
            r_rank.append(rank)
            r_node.append(node_id)
    return {
        "now": now, "actor": actor, "from": P, "to": A,
        "task": pgarrays.ints([p.task_id for p in placing]),
        "task_node": pgarrays.ints([p.node_id for p in placing]),
        "reason": pgarrays.texts([p.reason for p in placing]),
        "a_task": pgarrays.ints(a_task), "a_gpu": pgarrays.ints(a_gpu), "a_node": pgarrays.ints(a_node),
        "a_mem": pgarrays.ints(a_mem), "a_excl": pgarrays.bools(a_excl),
        "r_task": pgarrays.ints(r_task), "r_rank": pgarrays.ints(r_rank), "r_node": pgarrays.ints(r_node),
        **_COUNTER_PARAMS,
    }


def _placed(placing: list[Placing], taken: set[int], fan: FanOut) -> list[Placing]:
    """The placings whose tasks the place statement took, their servers (every rank's, for a
    gang) and pages told."""
    placed = [p for p in placing if p.task_id in taken]
    servers = {p.node_id for p in placed} | {n for p in placed for n in p.ranks}
    _bulk_fan_out(Move.PLACE, ((p.tenant_id, p.task_id) for p in placed), servers, fan, "placed")
    return placed


# The stream's batches are one prepared statement (a pass from empty sends five), planned once
# for the connection instead of parsed and planned for each batch. Generic plans are forced
# while the stream is open: PostgreSQL would plan the first five executions for their values,
# and such a plan of this statement took twice as long to run as the generic one. Five batches of
# a pass from empty (807 placements), written inside a rolled-back transaction, 16 times each,
# alternating: 111.1 ms bound on the client, 104.7 ms prepared, 234.6 ms planned for the values
# (measured on a slow day: the pass took about three times its usual time).
#
# The stream's settings, transaction-local, sent through the pipeline with its batches: the
# mode it found is kept in a setting of our own, so that putting it back needs no answer first.
_STREAM_OPENS = (
    "SET CONSTRAINTS ALL IMMEDIATE",
    "SELECT set_config('gpu_portal.plan_cache_mode', current_setting('plan_cache_mode'), true)",
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)",
)
_STREAM_CLOSES = (
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('plan_cache_mode', current_setting('gpu_portal.plan_cache_mode'), true)",
)


class PlacementStream:
    """``place_many`` in batches sent while the caller goes on working: a pass writes the
    placements its core has decided while the core decides the next ones.

    Each batch is ``place_many``'s statement, prepared (``_STREAM_OPENS``) and sent through
    psycopg's pipeline mode (``kernel.pipelined``) without waiting for its answer, and the
    transaction's foreign-key checks are immediate while the stream is open: PostgreSQL writes
    and checks one batch while Python decides the next. ``close`` waits for every batch, makes
    the checks deferred again (Django declares them initially deferred), puts the plan cache
    mode back as it was, and keeps the placings taken in ``taken``,
    as ``place_many`` returns them; a database error in any batch is raised there. Measured on a pass
    from empty (807 placements on 1,600 GPUs, batches of 150 and 300, 12 passes each,
    alternating): median 86-89 -> 78-79 ms.

    Not for a placing on GPUs that a preemption frees: the victims are released first.
    """

    def __init__(self, *, actor: str, now: datetime, fan: FanOut) -> None:
        self.actor, self.now, self.fan = actor, now, fan
        self.sent: list[Placing] = []
        self.taken: list[Placing] = []  # by close()
        self._pipelined: Pipelined | None = None
        self._batches: list[Any] = []  # each batch's cursor

    def send(self, placing: list[Placing]) -> None:
        if not placing:
            return
        if self._pipelined is None:
            self._pipelined = Pipelined()
            for statement in _STREAM_OPENS:
                self._pipelined.send(statement)
        self._batches.append(self._pipelined.send(
            _PLACE_SQL, _place_params(placing, actor=self.actor, now=self.now), prepare=True))
        self.sent.extend(placing)

    def run_after(self, sql: str, params: Any) -> None:
        """Run one more statement after the batches sent so far: in their pipeline, so that
        ``close`` waits for it with them (its error is raised there), or at once where no
        batch was sent. Its transaction-local settings are the stream's."""
        if self._pipelined is None:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
            return
        self._pipelined.send(sql, params)

    def close(self) -> None:
        pipelined, self._pipelined = self._pipelined, None
        if pipelined is None:
            return
        for statement in _STREAM_CLOSES:  # they run after every batch: one wait for all
            pipelined.send(statement)
        taken = {row[0] for rows in pipelined.fetchall(*self._batches) for row in rows}
        self.taken = _placed(self.sent, taken, self.fan)
