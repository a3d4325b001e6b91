"""What happens to a task when its agent, its user or an operator acts on it.

Each function locks the task row, changes state, allocations and events in one
transaction, and after commit tells whoever must know: the scheduler (GPUs were
freed), the agent (a process must be killed), websocket viewers.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from kernel import live
from kernel.alerts import raise_alert
from nodes.models import remember_models
from scheduling import triggers
from scheduling.choices import TaskStatus
from scheduling.models import ModelMemoryEstimate, Task, TaskRank
from scheduling.submission import ClusterLimits


def _changed(task: Task, *, node_id: int | None) -> None:
    live.tasks_changed([(task.tenant_id, task.pk)])
    if node_id is not None:
        live.assignments_changed([node_id])
        live.gpus_changed([node_id])


def _remember_model(task: Task) -> None:
    """The task's model is now loaded on its GPUs: the model-affinity score will prefer them."""
    if task.model_name:
        gpu_ids = task.allocations.filter(released_at__isnull=True).values_list("gpu_id", flat=True)
        remember_models(gpu_ids, [task.model_name])


def _gang_changed(task: Task, node_ids: list[int]) -> None:
    live.tasks_changed([(task.tenant_id, task.pk)])
    if node_ids:
        live.assignments_changed(node_ids)
        live.gpus_changed(node_ids)


def _my_rank(task: Task, node_id: int) -> TaskRank:
    """This server's rank of the gang's current attempt (the task row is locked: so is this)."""
    rank = task.ranks.filter(attempt=task.attempt, node_id=node_id).first()
    if rank is None:
        raise PermissionError(f"task {task.pk} is not assigned to this server")
    return rank


def report_ready(task_id: int, *, node_id: int, actor: str, attempt: int, address: str = "",
                 port: int | None = None, rank: int | None = None) -> Task:
    """A gang's rank reached the start barrier. Once every rank is ready, rank 0's address and
    port become the gang's MASTER_ADDR/MASTER_PORT and every agent is told to start its process."""
    with transaction.atomic():
        task = Task.locked(task_id)
        if not task.is_gang:
            raise PermissionError(f"task {task_id} is not a gang")
        if attempt != task.attempt:
            return task
        mine = _my_rank(task, node_id)
        if task.status != TaskStatus.ASSIGNED or mine.ready_at is not None:
            return task
        if mine.rank == 0 and (not address or port is None):
            raise ValueError("rank 0 must report its address and port")
        mine.ready_at, mine.address, mine.port = timezone.now(), address[:255], port
        mine.save(update_fields=["ready_at", "address", "port"])
        ranks = task.current_ranks()
        if all(r.ready_at is not None for r in ranks):
            task.master_addr, task.master_port = ranks[0].address, ranks[0].port
            task.save(update_fields=["master_addr", "master_port", "updated_at"])
            _gang_changed(task, [r.node_id for r in ranks])
        return task


def _gang_started(task: Task, node_id: int, actor: str) -> None:
    mine = _my_rank(task, node_id)
    if mine.started_at is None:
        mine.started_at = timezone.now()
        mine.save(update_fields=["started_at"])
    ranks = task.current_ranks()
    if task.status == TaskStatus.ASSIGNED and all(r.started_at is not None for r in ranks):
        task.transition(TaskStatus.RUNNING, actor=actor, reason=f"all {len(ranks)} ranks started")
        _remember_model(task)
        _changed(task, node_id=None)


def report_started(task_id: int, *, node_id: int, actor: str, attempt: int | None = None,
                   rank: int | None = None) -> Task:
    """The agent started the task's process. Idempotent: a repeat changes nothing,
    and so does a report about an earlier ``attempt`` than the task's current one.
    A gang runs once every rank has started."""
    with transaction.atomic():
        task = Task.locked(task_id)
        if task.is_gang:
            if attempt is None or attempt == task.attempt:
                _gang_started(task, node_id, actor)
            return task
        if task.node_id != node_id:
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if attempt is not None and attempt != task.attempt:
            return task
        if task.status == TaskStatus.ASSIGNED:
            task.mark_running(actor=actor)
            _remember_model(task)
            _changed(task, node_id=None)
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
    task's own request raised by the OOM factor (never past what a GPU can hold);
    a whole-GPU task stays whole."""
    if estimate is not None:
        return estimate.memory_mb
    if task.gpu_memory_mb is None:
        return None

    raised = int(task.gpu_memory_mb * settings.SCHEDULER.oom_memory_factor)
    return max(min(raised, ClusterLimits.load().max_task_memory_mb), task.gpu_memory_mb)


def _alert_oom(task: Task, *, node_id: int, estimate: ModelMemoryEstimate | None, final: bool) -> None:

    retry = (f"requeued (retry {task.attempt + 1} of {task.max_retries})" if not final
             else "failed: no retries left")
    raised = f"; {task.model_name} now needs {estimate.memory_mb} MB" if estimate else ""
    # The final OOM is news even while an earlier OOM alert of this task is still open.
    raise_alert("task_oom", f"task #{task.pk} {task.name} ran out of GPU memory{raised}; {retry}",
                node=node_id, task=task, repeat=final)


def _gang_finished(task: Task, node_id: int, *, exit_code: int | None, actor: str, oom: bool, reason: str,
                   timed_out: bool) -> bool:
    """One rank ended. Success waits for every rank; anything else ends the whole gang:
    its other ranks are stopped by their agents when the portal stops assigning them.
    Returns True when the caller should go on to end the task the one-server way."""
    mine = _my_rank(task, node_id)
    mine.exit_code, mine.finished_at = exit_code, timezone.now()
    mine.save(update_fields=["exit_code", "finished_at"])
    ranks = task.current_ranks()
    where = f"rank {mine.rank} on {mine.node.name}"
    if exit_code == 0 and not oom and not timed_out:
        if all(r.exit_code == 0 for r in ranks):
            task.finish(exit_code=0, actor=actor)
            _gang_changed(task, [r.node_id for r in ranks])
            triggers.request_pass(f"task {task.pk} finished")
        return False
    if oom or timed_out:
        return True
    if exit_code is None or exit_code < 0 or exit_code > 128:
        # Killed by a signal or lost: the infrastructure, not the program; run it again.
        how = f"killed by signal {abs(exit_code) % 128 or 9}" if exit_code is not None else "lost"
        task.requeue(actor=actor, reason=f"{where} {how}{'; ' + reason if reason else ''}; every rank was stopped")
    else:
        task.finish(exit_code=exit_code, actor=actor,
                    reason=f"{where} failed: {reason or f'exit code {exit_code}'}; every rank was stopped")
    _gang_changed(task, [r.node_id for r in ranks])
    triggers.request_pass(f"task {task.pk} ended")
    return False


def report_finished(task_id: int, *, node_id: int, exit_code: int | None, actor: str, oom: bool = False,
                    reason: str = "", timed_out: bool = False, attempt: int | None = None,
                    rank: int | None = None) -> Task:
    """The agent saw the process exit. An OOM raises the model's estimate and retries
    while retries remain; ``timed_out`` means the agent killed it at its timeout.
    Idempotent: a report for a task already final, or for an earlier ``attempt``
    (the task was requeued meanwhile), changes nothing."""
    with transaction.atomic():
        task = Task.locked(task_id)
        if not task.runs_on(node_id):
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if task.is_final or task.status == TaskStatus.PENDING:
            return task
        if attempt is not None and attempt != task.attempt:
            return task
        gang_nodes = task.node_ids() if task.is_gang else []
        if task.is_gang and not _gang_finished(task, node_id, exit_code=exit_code, actor=actor, oom=oom,
                                               reason=reason, timed_out=timed_out):
            return task
        if oom:
            estimate = record_oom(task)
            task.oom = True
            final = task.attempt >= task.max_retries
            _alert_oom(task, node_id=node_id, estimate=estimate, final=final)
            # Say it was an OOM whatever else the agent saw (an exit code is not the story).
            why = f"CUDA out of memory ({reason})" if reason and "out of memory" not in reason else (
                reason or "CUDA out of memory")
            if not final:
                # The next try asks for more than the size that failed, and the task shows how much.
                task.gpu_memory_mb = _retry_memory_mb(task, estimate)
                task.failure_reason = why[:500]
                retry = f"; retrying with {task.gpu_memory_mb} MB per GPU" if task.gpu_memory_mb else ""
                task.requeue(actor=actor, reason=why + retry)
                task.save(update_fields=["oom", "gpu_memory_mb", "failure_reason"])
            else:
                task.finish(exit_code=exit_code, oom=True, actor=actor, reason=why)
        else:
            task.finish(exit_code=exit_code, actor=actor, reason=reason, timed_out=timed_out)
        _changed(task, node_id=node_id)
        if gang_nodes:
            _gang_changed(task, gang_nodes)
        triggers.request_pass(f"task {task_id} finished")
        return task


def cancel(task_id: int, *, actor: str, reason: str = "cancelled") -> Task:
    """Cancel a task in any non-final state; a running process is killed by its agent."""
    with transaction.atomic():
        task = Task.locked(task_id)
        if task.is_final:
            return task
        node_id = task.node_id if task.is_active else None
        gang_nodes = task.node_ids() if task.is_gang and task.is_active else []
        task.cancel(actor=actor, reason=reason)
        _changed(task, node_id=node_id)
        if gang_nodes:
            _gang_changed(task, gang_nodes)
        if node_id is not None:
            triggers.request_pass(f"task {task_id} cancelled")
        return task


def report_lost(task_id: int, *, node_id: int, actor: str, reason: str, attempt: int | None = None,
                rank: int | None = None) -> Task:
    """The agent no longer knows the task's process (it restarted without it): the
    task goes back to pending while it has retries left, like a lost server's. A gang
    is requeued whole when any of its ranks is lost."""
    with transaction.atomic():
        task = Task.locked(task_id)
        if not task.runs_on(node_id):
            raise PermissionError(f"task {task_id} is not assigned to this server")
        if not task.is_active or (attempt is not None and attempt != task.attempt):
            return task
        gang_nodes = task.node_ids() if task.is_gang else []
        if gang_nodes:
            mine = _my_rank(task, node_id)
            reason = f"rank {mine.rank} on {mine.node.name} lost: {reason}; every rank was stopped"
        task.requeue(actor=actor, reason=reason)
        _changed(task, node_id=node_id)
        if gang_nodes:
            _gang_changed(task, gang_nodes)
        triggers.request_pass(f"task {task_id} lost")
        return task
