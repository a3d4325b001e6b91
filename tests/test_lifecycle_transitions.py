"""Every row of lifecycle's transition table: the event it writes and the news it sends.

Each move is made through the entry point its callers use (the agent's reports, a user's
cancel, the admin's actions, the pass's bulk placement, submission), and what reached the
fan-out sinks (live pushes, the scheduler wake-up, alerts) is recorded and compared with
what the move must tell. A new row in ``MOVES`` without a scenario here fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.db import transaction
from django.utils import timezone

from scheduling import lifecycle
from scheduling.choices import TRANSITIONS, TaskStatus
from scheduling.lifecycle import Move
from scheduling.models import Allocation, Task
from tenants.choices import Priority

P, A, R = TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.RUNNING


@dataclass
class Told:
    tasks: set[tuple[int, int]] = field(default_factory=set)
    assignments: set[int] = field(default_factory=set)
    gpus: set[int] = field(default_factory=set)
    wakes: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)


@pytest.fixture
def told(monkeypatch) -> Told:
    """The fan-out's sinks, recorded instead of sent."""
    seen = Told()
    monkeypatch.setattr("kernel.live.tasks_changed", lambda pairs: seen.tasks.update(pairs))
    monkeypatch.setattr("kernel.live.assignments_changed", lambda ids: seen.assignments.update(ids))
    monkeypatch.setattr("kernel.live.gpus_changed", lambda ids: seen.gpus.update(ids))
    monkeypatch.setattr("scheduling.triggers.request_pass", seen.wakes.append)
    monkeypatch.setattr("scheduling.lifecycle.raise_alert", lambda kind, message, **kw: seen.alerts.append(kind))
    return seen


def _task(tenant, node=None, *, status: str = R, gpu: int = 0, **kw) -> Task:
    task = Task.objects.create(tenant=tenant, name="job", command="true", status=status, node=node,
                               gpu_memory_mb=10_000, max_retries=2,
                               started_at=timezone.now() if status == R else None, **kw)
    if node is not None:
        Allocation.objects.create(task=task, gpu=node.gpus.get(index=gpu), node=node, memory_mb=10_000)
    return task


@dataclass(frozen=True)
class Expect:
    event: tuple[str, str, str, str]  # from, to, actor, reason
    agents: bool  # the agents (and GPU cells) of the task's server were told
    wake: bool
    alert: str = ""


def _submit(acme, node) -> tuple[Task, Expect]:
    task = Task(tenant=acme, name="job", command="true", status=P, pending_reason="waiting for the scheduler")
    with transaction.atomic(), lifecycle.batch() as fan:
        lifecycle.submit_many([task], actor="user:alice", limits={acme.pk: 100}, fan=fan)
    return task, Expect(("", P, "user:alice", "submitted"), agents=False, wake=True)


def _place(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, status=P)
    gpu = node.gpus.first()
    placing = lifecycle.Placing(task_id=task.pk, tenant_id=acme.pk, node_id=node.pk, reason="placed on GPU 0",
                                memory_mb=10_000, exclusive=True, gpus=((gpu.pk, node.pk),))
    with transaction.atomic(), lifecycle.batch() as fan:
        taken = lifecycle.place_many([placing], actor="scheduler", now=timezone.now(), fan=fan)
    assert taken == [placing]
    return task, Expect((P, A, "scheduler", "placed on GPU 0"), agents=True, wake=False)


def _start(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node, status=A)
    lifecycle.report_started(task.pk, node_id=node.pk, actor="agent:gpu-01")
    return task, Expect((A, R, "agent:gpu-01", "process started"), agents=False, wake=False)


def _finish(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    lifecycle.report_finished(task.pk, node_id=node.pk, exit_code=3, actor="agent:gpu-01")
    return task, Expect((R, TaskStatus.FAILED, "agent:gpu-01", "exit code 3"), agents=True, wake=True)


def _oom(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    lifecycle.report_finished(task.pk, node_id=node.pk, exit_code=1, oom=True, actor="agent:gpu-01")
    return task, Expect((R, P, "agent:gpu-01", "CUDA out of memory; retrying with 12000 MB per GPU"),
                        agents=True, wake=True, alert="task_oom")


def _time_out(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node, timeout_s=60)
    lifecycle.report_finished(task.pk, node_id=node.pk, exit_code=None, timed_out=True, actor="agent:gpu-01")
    return task, Expect((R, TaskStatus.TIMED_OUT, "agent:gpu-01", "exceeded its timeout of 60 s"),
                        agents=True, wake=True)


def _cancel(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    lifecycle.cancel(task.pk, actor="user:alice")
    return task, Expect((R, TaskStatus.CANCELLED, "user:alice", "cancelled"), agents=True, wake=True)


def _requeue(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    lifecycle.operator_requeue(task.pk, actor="admin:operator", reason="requeued by operator operator")
    return task, Expect((R, P, "admin:operator", "requeued by operator operator"), agents=True, wake=True)


def _preempt(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    with transaction.atomic(), lifecycle.batch() as fan:
        lifecycle.requeue(Task.locked(task.pk), actor="scheduler", reason="preempted by task 9", fan=fan,
                          move=Move.PREEMPT)
    return task, Expect((R, P, "scheduler", "preempted by task 9"), agents=True, wake=True)


def _lose(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, node)
    lifecycle.report_lost(task.pk, node_id=node.pk, actor="agent:gpu-01", reason="agent restarted")
    return task, Expect((R, P, "agent:gpu-01", "agent restarted"), agents=True, wake=True)


def _reprioritise(acme, node) -> tuple[Task, Expect]:
    task = _task(acme, status=P)
    lifecycle.reprioritise(task.pk, Priority.HIGH, actor="admin:operator")
    return task, Expect((P, P, "admin:operator", "priority NORMAL -> HIGH"), agents=False, wake=True)


SCENARIOS: dict[Move, Callable] = {
    Move.SUBMIT: _submit, Move.PLACE: _place, Move.START: _start, Move.FINISH: _finish, Move.OOM: _oom,
    Move.TIME_OUT: _time_out, Move.CANCEL: _cancel, Move.REQUEUE: _requeue, Move.PREEMPT: _preempt,
    Move.LOSE: _lose, Move.REPRIORITISE: _reprioritise,
}


def test_every_transition_in_the_table_has_a_scenario_here():
    assert set(SCENARIOS) == set(lifecycle.MOVES)


@pytest.mark.parametrize("move", list(lifecycle.MOVES), ids=str)
def test_every_edge_of_a_move_is_one_the_task_state_machine_allows(move):
    rule = lifecycle.MOVES[move]
    sources = rule.sources - {""}  # "" is before the task exists (submit)
    edges = {(s, s) for s in sources} if rule.keeps_status else {(s, t) for s in sources for t in rule.targets}
    assert all(t in TRANSITIONS[s] for s, t in edges if s != t), edges


@pytest.mark.parametrize("move", list(SCENARIOS), ids=str)
def test_each_transition_writes_its_event_and_tells_whom_it_must(move, acme, servers, told):
    node = servers[0]
    task, expect = SCENARIOS[move](acme, node)

    event = task.events.order_by("pk").last()
    assert (event.from_status, event.to_status, event.actor, event.reason) == expect.event
    rule = lifecycle.MOVES[move]
    assert expect.event[0] in rule.sources and expect.event[1] in rule.targets
    assert told.tasks == {(acme.pk, task.pk)}
    assert told.assignments == ({node.pk} if expect.agents else set())
    assert told.gpus == ({node.pk} if expect.agents else set())
    assert len(told.wakes) == (1 if expect.wake else 0)
    assert told.alerts == ([expect.alert] if expect.alert else [])


def test_cancelling_a_queued_task_tells_no_agent_and_wakes_nobody(acme, servers, told):
    task = _task(acme, status=P)
    lifecycle.cancel(task.pk, actor="user:alice")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED
    assert (told.tasks, told.assignments, told.wakes) == ({(acme.pk, task.pk)}, set(), [])


def test_a_move_the_table_does_not_allow_is_refused_and_changes_nothing(acme, servers, told):
    task = _task(acme, status=P)
    with (pytest.raises(lifecycle.IllegalTransition, match="lose is not allowed from pending"),
          transaction.atomic(), lifecycle.batch() as fan):
        lifecycle.requeue(Task.locked(task.pk), actor="sweep", reason="lost", fan=fan)
    task.refresh_from_db()
    assert (task.status, task.attempt, task.events.count()) == (P, 0, 0)
    assert told == Told()


def test_a_batch_of_transitions_is_told_once(acme, servers, told, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr("kernel.live.assignments_changed", lambda ids: calls.append("assignments"))
    tasks = [_task(acme, servers[i % 2], gpu=i) for i in range(4)]
    with transaction.atomic(), lifecycle.batch() as fan:
        for task in tasks:
            lifecycle.requeue(Task.locked(task.pk), actor="sweep", reason="server lost", fan=fan)
    assert calls == ["assignments"]
    assert told.gpus == {servers[0].pk, servers[1].pk}
    assert told.tasks == {(acme.pk, t.pk) for t in tasks}
    assert told.wakes == [f"task {tasks[0].pk}: lose (+3 more)"]


def test_nothing_is_told_when_the_transaction_fails(acme, servers, told):
    task = _task(acme, servers[0])
    with pytest.raises(RuntimeError), transaction.atomic(), lifecycle.batch() as fan:
        lifecycle.requeue(Task.locked(task.pk), actor="sweep", reason="server lost", fan=fan)
        raise RuntimeError("the caller failed after the move")
    assert told == Told()
    assert Task.objects.get(pk=task.pk).status == R


def test_a_pass_that_places_many_tasks_tells_each_sink_once(acme, servers, monkeypatch, settings):
    import dataclasses

    from scheduling.passes import run_pass

    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    calls: list[tuple[str, list]] = []
    for sink in ("tasks_changed", "assignments_changed", "gpus_changed"):
        monkeypatch.setattr(f"kernel.live.{sink}", lambda ids, sink=sink: calls.append((sink, sorted(ids))))
    monkeypatch.setattr("scheduling.triggers.request_pass", lambda reason: calls.append(("wake", [reason])))
    tasks = [_task(acme, status=P) for _ in range(8)]  # acme may run 8
    result = run_pass()
    assert result.placements == 8
    assert [name for name, _ids in calls] == ["assignments_changed", "gpus_changed", "tasks_changed"]
    assert dict(calls)["tasks_changed"] == sorted((acme.pk, t.pk) for t in tasks)
    placed = Task.objects.filter(pk__in=[t.pk for t in tasks], status=A)
    assert dict(calls)["assignments_changed"] == sorted({t.node_id for t in placed})
    assert placed.count() == 8
    assert all(t.events.get().reason.startswith("placed") for t in placed)
