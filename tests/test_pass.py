"""A scheduling pass against real PostgreSQL, with hand-made plans standing in for the core:
what it loads, what it writes, and how many queries that takes."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pghistory
import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from nodes.models import GPU, GPUHealth, NodeStatus
from scheduling.choices import ShareMode, TaskStatus
from scheduling.models import Allocation, ModelMemoryEstimate, SchedulerLock, Task, TaskEvent
from scheduling.passes import run_pass
from scheduling.placement import PendingInfo, Placement, Plan, Preemption, Snapshot
from tenants.choices import Priority
from tests.conftest import make_server


def submit(tenant, name: str = "job", **fields) -> Task:
    return Task.objects.create(tenant=tenant, name=name, command="python train.py", **fields)


class Recorder:
    """A stand-in for scheduling.placement.schedule that returns a given plan and keeps the snapshot."""

    def __init__(self, plan: Plan | None = None) -> None:
        self.plan = plan or Plan()
        self.snapshot: Snapshot | None = None

    def __call__(self, snapshot: Snapshot) -> Plan:
        self.snapshot = snapshot
        return self.plan


def gpu_ids(node, *indexes: int) -> tuple[int, ...]:
    by_index = dict(node.gpus.values_list("index", "id"))
    return tuple(by_index[i] for i in indexes)


def test_a_placement_becomes_allocations_an_assigned_task_and_an_event(acme, servers):
    task = submit(acme, gpu_count=2, gpu_memory_mb=30_000)
    gpus = gpu_ids(servers[0], 0, 1)
    plan = Plan(placements=[Placement(task.pk, servers[0].pk, gpus, 30_000, True)])

    result = run_pass(schedule=Recorder(plan))

    task.refresh_from_db()
    assert (task.status, task.node_id, task.pending_reason, task.queue_position) == (
        TaskStatus.ASSIGNED, servers[0].pk, "", None)
    assert task.assigned_at is not None
    allocations = Allocation.objects.filter(task=task, released_at__isnull=True)
    assert sorted(a.gpu_id for a in allocations) == sorted(gpus)
    assert {(a.memory_mb, a.exclusive, a.node_id) for a in allocations} == {(30_000, True, servers[0].pk)}
    event = TaskEvent.objects.get(task=task)
    assert (event.from_status, event.to_status, event.actor) == ("pending", "assigned", "scheduler")
    assert event.reason == "placed on gpu-01, GPU 0,1 (30000 MB each, exclusive)"
    assert result.placements == 1
    assert GPU.objects.get(pk=gpus[0]).idle_since is None


def test_pending_tasks_get_the_reason_and_position_from_the_plan(acme, servers):
    first, second = submit(acme, "a"), submit(acme, "b")
    plan = Plan(pending={first.pk: PendingInfo("tenant acme at its GPU quota (8/8)", 1),
                         second.pk: PendingInfo("waiting behind 1 higher-priority task", 2)})

    result = run_pass(schedule=Recorder(plan))

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.pending_reason, first.queue_position) == ("tenant acme at its GPU quota (8/8)", 1)
    assert (second.pending_reason, second.queue_position) == ("waiting behind 1 higher-priority task", 2)
    assert result.pending == 2


def test_unchanged_pending_reasons_are_not_written_again(acme, servers):
    task = submit(acme)
    plan = Plan(pending={task.pk: PendingInfo("no server has 1 free GPU", 1)})
    run_pass(schedule=Recorder(plan))

    with CaptureQueriesContext(connection) as queries:
        run_pass(schedule=Recorder(plan))

    assert not [q for q in queries.captured_queries if "pending_reason = v.reason" in q["sql"]]


def test_the_task_table_leaves_room_in_its_pages_for_the_queues_rewrites(db):
    # One task entering or leaving the queue moves every position behind it, and the pass writes
    # them all: with room on the page those rewrites are HOT updates, which touch no index
    # (migration 0016 has the measurements). Nothing else in the schema says so.
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE oid = 'scheduling_task'::regclass")
        assert cursor.fetchone()[0] == ["fillfactor=80"]


def test_the_snapshot_shows_claimed_memory_usage_and_what_is_not_schedulable(acme, globex, servers, settings):
    node, other = servers
    running = submit(acme, "running", status=TaskStatus.RUNNING, node=node, gpu_memory_mb=20_000,
                     started_at=timezone.now())
    g0, g1, g2, g3 = gpu_ids(node, 0, 1, 2, 3)
    Allocation.objects.create(task=running, gpu_id=g0, node=node, memory_mb=20_000, exclusive=False)
    GPU.objects.filter(pk=g1).update(cordoned=True)
    GPU.objects.filter(pk=g2).update(health=GPUHealth.ERROR)
    GPU.objects.filter(pk=g3).update(reserved=True)
    other.status = NodeStatus.DRAINING
    other.save()
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, reserved_gpus=("GPU-gpu-01-5", "gpu-01:6"))
    ModelMemoryEstimate.objects.create(model_name="deepseek-7b", memory_mb=24_000)
    low = submit(globex, "low", priority=Priority.LOW)
    by_model = submit(acme, "by-model", model_name="deepseek-7b", share_mode=ShareMode.SHARED)
    explicit = submit(acme, "explicit", model_name="deepseek-7b", gpu_memory_mb=10_000)
    recorder = Recorder()

    run_pass(schedule=recorder)

    snap = recorder.snapshot
    gpus = {g.id: g for n in snap.nodes for g in n.gpus}
    assert len(gpus) == 16
    assert (gpus[g0].memory_claimed_mb, gpus[g0].shared_count, gpus[g0].exclusive_taken) == (20_000, 1, False)
    unschedulable = {g.index for g in gpus.values() if g.node_id == node.pk and not g.schedulable}
    assert unschedulable == {1, 2, 3, 5, 6}
    assert {n.name: n.schedulable for n in snap.nodes} == {"gpu-01": True, "gpu-02": False}
    acme_state = snap.tenants[acme.pk]
    assert (acme_state.used_gpus, acme_state.used_gpu_memory_mb, acme_state.running_tasks) == (1, 20_000, 1)
    assert (acme_state.max_gpus, acme_state.max_running_tasks) == (8, 8)
    assert [r.id for r in snap.running] == [running.pk]
    assert snap.running[0].gpu_ids == (g0,)
    assert snap.running[0].expected_end == running.started_at + timedelta(seconds=running.timeout_s)
    pending = {p.id: p for p in snap.pending}
    assert [p.id for p in snap.pending] == [by_model.pk, explicit.pk, low.pk]  # priority, then FIFO
    assert pending[by_model.pk].memory_mb == 24_000  # the model's remembered estimate
    assert pending[by_model.pk].exclusive is False
    assert pending[explicit.pk].memory_mb == 10_000  # an explicit size wins
    assert pending[low.pk].memory_mb is None


def test_a_preempted_task_returns_to_pending_with_an_event(acme, globex, servers, settings):
    node = servers[0]
    victim = submit(globex, "batch", status=TaskStatus.RUNNING, node=node, priority=Priority.LOW)
    (g0,) = gpu_ids(node, 0)
    Allocation.objects.create(task=victim, gpu_id=g0, node=node, memory_mb=80_000)
    urgent = submit(acme, "urgent", priority=Priority.CRITICAL)
    plan = Plan(placements=[Placement(urgent.pk, node.pk, (g0,), 80_000, True)],
                preemptions=[Preemption(victim.pk, urgent.pk, "preempted by CRITICAL task")])

    result = run_pass(schedule=Recorder(plan))

    victim.refresh_from_db()
    assert (victim.status, victim.attempt, victim.node_id) == (TaskStatus.PENDING, 1, None)
    assert victim.events.last().reason == "preempted by CRITICAL task"
    assert Allocation.objects.get(gpu_id=g0, released_at__isnull=True).task_id == urgent.pk
    assert (result.placements, result.preemptions) == (1, 1)


def test_a_task_that_left_the_queue_during_the_pass_is_not_placed(acme, servers):
    task = submit(acme)
    plan = Plan(placements=[Placement(task.pk, servers[0].pk, gpu_ids(servers[0], 0), 10_000, True)])

    def cancel_meanwhile(snapshot: Snapshot) -> Plan:
        Task.objects.filter(pk=task.pk).update(status=TaskStatus.CANCELLED)
        return plan

    result = run_pass(schedule=cancel_meanwhile)

    assert (result.placements, result.skipped) == (0, 1)
    assert not Allocation.objects.exists()


def test_the_database_refuses_a_plan_that_gives_one_gpu_to_two_tasks(acme, servers):
    a, b = submit(acme, "a"), submit(acme, "b")
    gpu = gpu_ids(servers[0], 0)
    plan = Plan(placements=[Placement(a.pk, servers[0].pk, gpu, 1000, True),
                            Placement(b.pk, servers[0].pk, gpu, 1000, True)])

    with pytest.raises(IntegrityError):
        run_pass(schedule=Recorder(plan))

    assert not Allocation.objects.exists()
    assert set(Task.objects.values_list("status", flat=True)) == {TaskStatus.PENDING}


def test_the_pass_records_who_holds_the_lock(acme, servers):
    run_pass(actor="scheduler:test", schedule=Recorder())
    lock = SchedulerLock.objects.get(name="scheduler")
    assert lock.holder.endswith(":scheduler:test")
    assert lock.acquired_at is not None


def test_a_pass_recreates_a_missing_lock_row_and_still_places(acme, servers):
    # The lock leads the snapshot's batch of reads; without its row those reads held no lock
    # and are read again once lock_scheduler has recreated the row and taken it.
    SchedulerLock.objects.filter(name="scheduler").delete()
    task = submit(acme, gpu_memory_mb=30_000)
    plan = Plan(placements=[Placement(task.pk, servers[0].pk, gpu_ids(servers[0], 0), 30_000, True)])
    recorder = Recorder(plan)

    result = run_pass(actor="scheduler:test", schedule=recorder)

    assert result.placements == 1
    assert [t.id for t in recorder.snapshot.pending] == [task.pk]
    lock = SchedulerLock.objects.get(name="scheduler")
    assert lock.holder.endswith(":scheduler:test")
    assert recorder.snapshot.now == lock.acquired_at


def test_the_snapshot_clock_is_the_lock_time(acme, servers):
    recorder = Recorder()
    run_pass(actor="scheduler:test", schedule=recorder)
    assert recorder.snapshot.now == SchedulerLock.objects.get(name="scheduler").acquired_at


def _cluster_with_work(tenant, servers: int, prefix: str) -> Plan:
    nodes = [make_server(f"{prefix}-{i:03d}") for i in range(servers)]
    plan = Plan()
    for i, node in enumerate(nodes):
        placed = submit(tenant, f"placed-{i}")
        waiting = submit(tenant, f"waiting-{i}")
        plan.placements.append(Placement(placed.pk, node.pk, gpu_ids(node, 0, 1), 1000, True))
        plan.pending[waiting.pk] = PendingInfo(f"waiting {i}", i + 1)
        running = submit(tenant, f"running-{i}", status=TaskStatus.RUNNING, node=node)
        Allocation.objects.create(task=running, gpu_id=gpu_ids(node, 7)[0], node=node, memory_mb=1000)
    return plan


@pytest.mark.parametrize("servers_count", [2, 40])
def test_the_number_of_queries_of_a_pass_does_not_grow_with_the_cluster(acme, servers_count,
                                                                        django_assert_max_num_queries):
    plan = _cluster_with_work(acme, servers_count, f"n{servers_count}")

    # 10 for the pass itself (clearing the request; the lock with the snapshot's reads in one round
    # trip; the GPUs' rows it had not seen, three statements sent together: nested loops off, the
    # read, on; the placements; idle clocks; pending reasons; in this test's transaction a
    # savepoint and its release), +1 for the metrics counter UPSERT after it.
    with django_assert_max_num_queries(11):
        result = run_pass(schedule=Recorder(plan))

    assert result.placements == servers_count
    assert Allocation.objects.filter(released_at__isnull=True).count() == 3 * servers_count


def test_after_an_oom_the_retry_is_placed_with_the_raised_model_estimate(acme, servers):
    from scheduling import lifecycle

    task = submit(acme, "infer", model_name="deepseek-7b", gpu_memory_mb=20_000, max_retries=2)
    assert run_pass().placements == 1  # the real placement core
    task.refresh_from_db()
    lifecycle.report_started(task.pk, node_id=task.node_id, actor="agent")
    lifecycle.report_finished(task.pk, node_id=task.node_id, exit_code=1, oom=True, actor="agent")

    assert run_pass().placements == 1

    task.refresh_from_db()
    assert (task.status, task.attempt, task.gpu_memory_mb) == (TaskStatus.ASSIGNED, 1, 24_000)
    assert Allocation.objects.get(task=task, released_at__isnull=True).memory_mb == 24_000


def test_releasing_the_last_allocation_of_a_gpu_starts_its_idle_clock(acme, servers):
    node = servers[0]
    (g0,) = gpu_ids(node, 0)
    first = submit(acme, "a", status=TaskStatus.RUNNING, node=node)
    second = submit(acme, "b", status=TaskStatus.RUNNING, node=node)
    for task in (first, second):
        Allocation.objects.create(task=task, gpu_id=g0, node=node, memory_mb=1000, exclusive=False)

    first.finish(exit_code=0, actor="agent")
    assert GPU.objects.get(pk=g0).idle_since is None  # the second task still holds it
    second.finish(exit_code=0, actor="agent")

    assert GPU.objects.get(pk=g0).idle_since is not None
    recorder = Recorder()
    run_pass(schedule=recorder)
    states = {g.id: g for n in recorder.snapshot.nodes for g in n.gpus}
    assert states[g0].idle_since == GPU.objects.get(pk=g0).idle_since


def test_a_busy_gpu_is_never_shown_as_idle(acme, servers):
    node = servers[0]
    (g0,) = gpu_ids(node, 0)
    GPU.objects.filter(pk=g0).update(idle_since=timezone.now() - timedelta(hours=2))
    task = submit(acme, status=TaskStatus.RUNNING, node=node)
    Allocation.objects.create(task=task, gpu_id=g0, node=node, memory_mb=1000)
    recorder = Recorder()

    run_pass(schedule=recorder)

    assert {g.id: g for n in recorder.snapshot.nodes for g in n.gpus}[g0].idle_since is None


def test_the_snapshot_reads_leave_the_planner_settings_as_they_found_them(acme, servers):
    """The reads turn nested loops off for themselves only (stale statistics after a burst
    made the planner pick quadratic nested loops), and sorting off for the queue's read only
    (it reads the queue's index); the pass's writes plan normally."""
    from django.db import connection, transaction

    from scheduling.passes import load_snapshot

    with transaction.atomic(), connection.cursor() as cursor:
        load_snapshot(timezone.now())
        cursor.execute("SELECT current_setting('enable_nestloop'), current_setting('enable_sort')")
        assert cursor.fetchone() == ("on", "on")


def test_the_queue_is_read_in_its_index_order_without_a_sort(acme, servers):
    """Even where every task is pending, when a scan and a sort look cheaper to the planner:
    the plans of the snapshot's reads, as PostgreSQL ran them (auto_explain, sent back as notices)."""
    from django.db import connection, transaction

    from scheduling.passes import load_snapshot

    tasks = [submit(acme, f"q{i}", priority=i % 4) for i in range(30)]
    plans: list[str] = []

    def keep(notice) -> None:
        plans.append(notice.message_primary)

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ANALYZE scheduling_task")
        cursor.execute("LOAD 'auto_explain'")
        cursor.execute("SET LOCAL auto_explain.log_min_duration = 0")
        cursor.execute("SET LOCAL auto_explain.log_level = 'notice'")
        cursor.execute("SET LOCAL client_min_messages = 'notice'")
        connection.connection.add_notice_handler(keep)
        try:
            snapshot = load_snapshot(timezone.now()).snapshot
        finally:
            connection.connection.remove_notice_handler(keep)
    queue_reads = [plan for plan in plans if "task_pending_queue_idx" in plan]
    assert len(queue_reads) == 1, plans
    assert "Sort" not in queue_reads[0]
    # Highest priority first, then oldest first.
    assert [t.id for t in snapshot.pending] == [t.pk for p in (3, 2, 1, 0) for t in tasks if t.priority == p]


def test_a_task_no_idle_gpu_can_hold_is_told_so_instead_of_waiting(acme, servers):
    GPU.objects.update(memory_used_mb=512)  # what an idle GPU reports
    task = submit(acme, "too-big", gpu_memory_mb=81_559 - 2_000)  # the most the API accepts
    assert run_pass().placements == 0
    task.refresh_from_db()
    assert task.pending_reason.startswith("can never fit on the active servers: no active server has 1 GPU with")


def test_a_pass_run_under_the_audits_context_places_and_leaves_the_context_in_place(acme, servers):
    # pghistory's context (an audited request with a synchronous django-q cluster, manage.py
    # shell) prefixes writes with a statement of its own and skips to the last result.
    task = submit(acme)
    with pghistory.context(source="shell"):
        wrappers = list(connection.execute_wrappers)
        assert wrappers
        result = run_pass()
        assert connection.execute_wrappers == wrappers

    task.refresh_from_db()
    assert result.placements == 1 and task.status == TaskStatus.ASSIGNED
