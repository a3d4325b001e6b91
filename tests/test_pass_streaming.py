"""A pass writes the placements its core has decided while the core decides the next ones
(scheduling.lifecycle.PlacementStream): what it writes, what it leaves to the plan, how its
batches are planned, and that the transaction's settings are put back afterwards."""

from __future__ import annotations

import dataclasses

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from kernel.pipelined import Pipelined
from scheduling import lifecycle, passes
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task, TaskEvent
from scheduling.passes import run_pass
from tenants.models import Quota


def _submit(tenant, name: str, **fields) -> Task:
    return Task.objects.create(tenant=tenant, name=name, command="python train.py", **fields)


def _place_statements(queries) -> int:
    return sum(1 for q in queries if q["sql"].lstrip().startswith("WITH placed AS"))


def _prepared_place_statements() -> list[tuple[int, int]]:
    """(generic plans, custom plans) of each placement statement this connection prepared."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                       ["%WITH placed AS%"])
        return cursor.fetchall()


def test_a_pass_writes_its_placements_in_batches_while_the_core_decides(acme, servers, monkeypatch):
    monkeypatch.setattr(passes, "STREAM_FIRST_BATCH", 1)
    monkeypatch.setattr(passes, "STREAM_BATCH", 3)
    sizes: list[int] = []
    send = lifecycle.PlacementStream.send
    monkeypatch.setattr(lifecycle.PlacementStream, "send",
                        lambda self, placing: (sizes.append(len(placing)), send(self, placing)))
    tasks = [_submit(acme, f"job-{i}", gpu_count=1) for i in range(5)]

    with CaptureQueriesContext(connection) as queries:
        result = run_pass()

    assert result.placements == 5 and result.skipped == 0
    # The first batch early (PostgreSQL has nothing to do until it comes), then full ones,
    # then what is left when the core is done.
    assert sizes == [1, 3, 1]
    assert _place_statements(queries.captured_queries) == 3
    for task in tasks:
        task.refresh_from_db()
        assert task.status == TaskStatus.ASSIGNED
        assert Allocation.objects.filter(task=task, released_at__isnull=True).count() == 1
        assert TaskEvent.objects.filter(task=task, to_status=TaskStatus.ASSIGNED).count() == 1
    assert Allocation.objects.values("gpu").distinct().count() == 5


def test_after_the_stream_the_transactions_foreign_key_checks_are_deferred_again(acme, servers):
    _submit(acme, "job")
    assert run_pass().placements == 1

    # A dangling event is accepted until the checks run (Django declares them initially deferred)...
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO scheduling_taskevent (task_id, from_status, to_status, actor, reason, "
                           "created_at) VALUES (-1, '', 'pending', 'test', '', now())")
        # ...and refused when they do.
        with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        transaction.set_rollback(True)


def test_the_batches_are_one_prepared_statement_planned_generically_and_the_mode_is_put_back(
        acme, servers, monkeypatch):
    monkeypatch.setattr(passes, "STREAM_FIRST_BATCH", 1)
    monkeypatch.setattr(passes, "STREAM_BATCH", 2)
    for i in range(5):
        _submit(acme, f"job-{i}", gpu_count=1)
    with connection.cursor() as cursor:
        # Transaction-local, as the stream's own setting: it would outlive the pass's savepoint.
        cursor.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")

    assert run_pass().placements == 5

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('plan_cache_mode')")
        assert cursor.fetchone() == ("force_custom_plan",)
    assert _prepared_place_statements() == [(3, 0)]  # batches of 1, 2 and 2


def test_without_prepared_statements_the_batches_are_bound_on_the_client(acme, servers, monkeypatch):
    """DB_PREPARED_STATEMENTS=false (PgBouncer in transaction mode before 1.21)."""
    for i in range(3):
        _submit(acme, f"job-{i}", gpu_count=1)
    connection.ensure_connection()
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)

    assert run_pass().placements == 3
    assert _prepared_place_statements() == []


def test_a_gang_is_streamed_with_its_ranks_for_the_attempt_it_is_in(acme, servers, settings, monkeypatch):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=0.0, batch_share=1.0)
    sent: list[lifecycle.Placing] = []
    send = lifecycle.PlacementStream.send
    monkeypatch.setattr(lifecycle.PlacementStream, "send",
                        lambda self, placing: (sent.extend(placing), send(self, placing))[1])
    gang = _submit(acme, "gang", gpu_count=16, nodes=2)
    Task.objects.filter(pk=gang.pk).update(attempt=2)  # requeued twice before
    single = _submit(acme, "single", gpu_count=1)
    Quota.objects.filter(tenant=acme).update(max_gpus=32, max_gpu_memory_mb=10**7)

    with CaptureQueriesContext(connection) as queries:
        result = run_pass()

    gang.refresh_from_db()
    single.refresh_from_db()
    assert result.placements == 1 and gang.status == TaskStatus.ASSIGNED, gang.pending_reason
    assert [p.task_id for p in sent] == [gang.pk]
    assert _place_statements(queries.captured_queries) == 1
    ranks = list(gang.ranks.order_by("rank").values_list("attempt", "rank", "node_id"))
    assert ranks == [(2, rank, node_id) for rank, node_id in enumerate(sent[0].ranks)]
    assert {node_id for _, _, node_id in ranks} == {s.pk for s in servers}
    assert gang.node_id == ranks[0][2]
    assert Allocation.objects.filter(task=gang, released_at__isnull=True).count() == 16
    assert single.status == TaskStatus.PENDING  # both servers are the gang's


def test_a_gang_that_is_no_longer_pending_gets_no_ranks(acme, servers):
    gpus = [(g.pk, g.node_id) for s in servers for g in s.gpus.order_by("index")]
    gang = _submit(acme, "gang", gpu_count=16, nodes=2)
    Task.objects.filter(pk=gang.pk).update(status=TaskStatus.CANCELLED)
    placing = lifecycle.Placing(task_id=gang.pk, tenant_id=acme.pk, node_id=servers[0].pk, reason="test",
                                memory_mb=1_000, exclusive=True, gpus=tuple(gpus),
                                ranks=tuple(s.pk for s in servers))

    with lifecycle.batch() as fan:
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.send([placing])
        stream.close()

    assert stream.taken == []
    assert not gang.ranks.exists() and not Allocation.objects.filter(task=gang).exists()


def _placing(task: Task, gpu) -> lifecycle.Placing:
    return lifecycle.Placing(task_id=task.pk, tenant_id=task.tenant_id, node_id=gpu.node_id, reason="test",
                             memory_mb=1_000, exclusive=True, gpus=((gpu.pk, gpu.node_id),))


def test_a_streamed_task_that_is_no_longer_pending_is_left_out(acme, servers):
    gpus = list(servers[0].gpus.order_by("index"))
    kept, cancelled = _submit(acme, "kept"), _submit(acme, "cancelled")
    Task.objects.filter(pk=cancelled.pk).update(status=TaskStatus.CANCELLED)

    with lifecycle.batch() as fan:
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.send([_placing(kept, gpus[0]), _placing(cancelled, gpus[1])])
        stream.close()

    assert [p.task_id for p in stream.taken] == [kept.pk]
    assert list(Allocation.objects.values_list("task", flat=True)) == [kept.pk]


def test_a_batch_the_database_refuses_fails_the_stream_with_djangos_error(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    holder, other = _submit(acme, "holder"), _submit(acme, "other")
    Allocation.objects.create(task=holder, gpu=gpu, node=gpu.node, memory_mb=1_000)

    with (pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic(),
          lifecycle.batch() as fan):
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.send([_placing(other, gpu)])
        stream.close()

    other.refresh_from_db()
    assert other.status == TaskStatus.PENDING
    assert not Allocation.objects.filter(task=other).exists()


def test_a_statement_run_after_the_batches_sees_them_and_is_waited_for_with_them(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    task = _submit(acme, "job")

    with lifecycle.batch() as fan:
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.send([_placing(task, gpu)])
        stream.run_after("UPDATE scheduling_task SET pending_reason = 'after' WHERE id = %s AND status = %s",
                         [task.pk, TaskStatus.ASSIGNED])
        stream.close()

    task.refresh_from_db()
    assert task.pending_reason == "after"  # it ran after the batch had assigned the task


def test_a_statement_run_after_no_batch_runs_at_once(acme, servers):
    task = _submit(acme, "job")

    with lifecycle.batch() as fan:
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.run_after("UPDATE scheduling_task SET pending_reason = 'now' WHERE id = %s", [task.pk])
        task.refresh_from_db()
        assert task.pending_reason == "now"
        stream.close()


def test_a_statement_run_after_the_batches_that_fails_fails_the_stream_at_close(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    task = _submit(acme, "job")

    with (pytest.raises(IntegrityError, match="queue_position"), transaction.atomic(), lifecycle.batch() as fan):
        stream = lifecycle.PlacementStream(actor="test", now=timezone.now(), fan=fan)
        stream.send([_placing(task, gpu)])
        stream.run_after("UPDATE scheduling_task SET queue_position = -1 WHERE id = %s", [task.pk])
        stream.close()

    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING and task.queue_position is None


def test_the_waiting_tasks_reasons_go_through_the_streams_pipeline_after_the_last_batch(
        acme, servers, monkeypatch):
    monkeypatch.setattr(passes, "STREAM_FIRST_BATCH", 1)
    sent: list[str] = []
    send = Pipelined.send
    monkeypatch.setattr(Pipelined, "send",
                        lambda self, sql, params=None, **kw: (sent.append(sql), send(self, sql, params, **kw))[1])
    placed = [_submit(acme, f"job-{i}", gpu_count=1) for i in range(2)]
    waiting = _submit(acme, "beyond-the-quota", gpu_count=8)

    result = run_pass()

    assert result.placements == 2
    waiting.refresh_from_db()
    assert waiting.status == TaskStatus.PENDING and waiting.queue_position == 1
    assert "quota" in waiting.pending_reason, waiting.pending_reason
    for task in placed:
        task.refresh_from_db()
        assert task.status == TaskStatus.ASSIGNED and task.pending_reason == "" and task.queue_position is None
    kinds = ["place" if sql.lstrip().startswith("WITH placed AS") else
             "reasons" if sql is passes._UPDATE_PENDING_SQL else "setting" for sql in sent]
    # The stream's settings, its batches, the reasons, then its closing settings: one wait for all.
    last_batch = max(i for i, kind in enumerate(kinds) if kind == "place")
    assert kinds[last_batch + 1:] == ["reasons"] + ["setting"] * len(lifecycle._STREAM_CLOSES)
    assert kinds.count("reasons") == 1
