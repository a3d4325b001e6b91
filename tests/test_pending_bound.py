"""Each tenant's bound on its pending tasks (scheduling.models.PendingBound): kept by the
database whoever writes the tasks, never below the pending count, and what lets a submit
check the pending limit without counting the queue."""

from __future__ import annotations

import importlib

import psycopg
import pytest
from django.db import connection
from django.db.models import Sum

from scheduling import lifecycle, submission
from scheduling.choices import TaskStatus
from scheduling.models import PendingBound, PendingBoundRaise, Task
from scheduling.passes import run_pass
from tenants.models import Quota, Tenant
from tests.conftest import database_url


def _bound(tenant) -> int:
    raised = PendingBoundRaise.objects.filter(tenant=tenant).aggregate(n=Sum("n"))["n"] or 0
    return PendingBound.objects.get(tenant=tenant).bound + raised


def _pending(tenant) -> int:
    return Task.objects.filter(tenant=tenant, status=TaskStatus.PENDING).count()


def _submit(user, n: int, tenant: str = "acme") -> list[Task]:
    ctx = submission.SubmitContext.load(user)
    specs = []
    for i in range(n):
        spec, errors = submission.validate({"tenant": tenant, "name": f"t{i}", "command": "python x.py"}, ctx)
        assert not errors, errors
        specs.append(spec)
    return submission.create_tasks(ctx, specs)


def _raw(sql: str, params=()) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_a_new_tenant_starts_at_zero_and_every_task_entering_the_queue_raises_it(acme, alice, servers):
    assert _bound(acme) == 0
    tasks = _submit(alice, 2)
    assert _bound(acme) == 2
    # Written by anyone, not only the API: a row inserted by hand counts the same.
    columns = ", ".join(f.column for f in Task._meta.concrete_fields if not f.primary_key)
    _raw(f"INSERT INTO scheduling_task ({columns}) SELECT {columns} FROM scheduling_task WHERE id = %s",  # noqa: S608
         [tasks[0].pk])
    Task.objects.create(tenant=acme, name="done", command="true", status=TaskStatus.SUCCEEDED)
    assert _bound(acme) == 3 == _pending(acme)

    # Leaving the queue lowers nothing; coming back to it raises the bound again.
    assert run_pass().placements == 3
    assert _bound(acme) == 3 and _pending(acme) == 0
    placed = Task.objects.get(pk=tasks[1].pk)
    with lifecycle.batch() as fan:
        lifecycle.requeue(placed, actor="test", reason="server lost", fan=fan)
    assert _bound(acme) == 4 and _pending(acme) == 1
    # A pending task's reason or position is not a move into the queue.
    Task.objects.filter(pk=placed.pk).update(pending_reason="waiting", queue_position=1)
    assert _bound(acme) == 4


def test_a_submit_counts_only_when_the_bound_would_pass_the_limit(acme, alice, servers):
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=5)
    first = _submit(alice, 2)
    for task in first:
        lifecycle.cancel(task.pk, actor="test")
    assert _bound(acme) == 2 and _pending(acme) == 0

    _submit(alice, 2)  # 2 + 2 <= 5: the bound is taken as it stands, and raised
    assert _bound(acme) == 4 and _pending(acme) == 2
    _submit(alice, 2)  # 4 + 2 > 5: counted (2), so it fits, and the bound is the count again
    assert _bound(acme) == 4 == _pending(acme)
    with pytest.raises(submission.SubmitError) as refused:
        _submit(alice, 2)  # counted: exactly 4, and 4 + 2 > 5
    assert "it has 4, this adds 2" in refused.value.errors["tenant"][0]
    assert _bound(acme) == 4 == _pending(acme)


def test_a_tenant_without_a_bound_is_counted_every_time(acme, alice, servers):
    PendingBound.objects.filter(tenant=acme).delete()
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=3)
    _submit(alice, 2)
    with pytest.raises(submission.SubmitError, match="it has 2, this adds 2"):
        _submit(alice, 2)
    assert not PendingBound.objects.filter(tenant=acme).exists()


def test_the_migration_sets_every_tenants_bound_to_its_pending_count(acme, globex, alice, servers):
    migration = importlib.import_module("scheduling.migrations.0015_pending_bound")
    _submit(alice, 3)
    Task.objects.filter(tenant=acme, name="t0").update(status=TaskStatus.CANCELLED)
    PendingBound.objects.all().delete()
    PendingBoundRaise.objects.all().delete()
    _raw(migration.BACKFILL)
    assert (_bound(acme), _bound(globex)) == (2, 0)


@pytest.mark.django_db(transaction=True)
def test_moves_into_the_queue_never_wait_for_each_other_or_for_a_submit(acme, alice, servers):
    """A counter row they updated would stay locked until each transaction ends: a sweep
    requeueing one server's tasks and an agent's report requeueing another task of the same
    tenant could deadlock. Raises are rows of their own."""
    held = _submit(alice, 2)
    Task.objects.filter(pk__in=[t.pk for t in held]).update(status=TaskStatus.RUNNING)
    with psycopg.connect(database_url()) as first, psycopg.connect(database_url()) as second:
        first.execute("SET lock_timeout = '2s'")
        second.execute("SET lock_timeout = '2s'")
        first.execute("UPDATE scheduling_task SET status = 'pending' WHERE id = %s", [held[0].pk])
        second.execute("UPDATE scheduling_task SET status = 'pending' WHERE id = %s", [held[1].pk])
        _submit(alice, 1)  # and a submit of the same tenant meanwhile
        second.commit()
        first.commit()
    assert _pending(acme) == 3
    assert _bound(acme) >= 3


@pytest.mark.django_db(transaction=True)
def test_a_recount_leaves_the_raise_of_a_task_that_came_back_to_the_queue_meanwhile(acme, alice, servers):
    """A task moved back to the queue by a transaction that commits after the submit's
    statement began is not in its count: its raise must outlive the recount."""
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=3)
    running = _submit(alice, 1)[0]
    Task.objects.filter(pk=running.pk).update(status=TaskStatus.RUNNING)
    _submit(alice, 2)
    Task.objects.filter(tenant=acme, status=TaskStatus.PENDING).update(status=TaskStatus.CANCELLED)
    assert _bound(acme) == 3 and _pending(acme) == 0  # so the next submit recounts

    with psycopg.connect(database_url()) as requeuer:
        requeuer.execute("UPDATE scheduling_task SET status = 'pending' WHERE id = %s", [running.pk])
        _submit(alice, 1)  # counts 0 pending: the requeue is not committed
        requeuer.commit()
    assert _pending(acme) == 2
    assert _bound(acme) == 2


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_a_deleted_tenant_takes_its_bound_along(servers, how):
    tenant = Tenant.objects.create(name="Short-lived", slug="short")
    PendingBoundRaise.objects.create(tenant=tenant, n=1)
    assert PendingBound.objects.filter(tenant=tenant).exists()
    if how == "orm":
        tenant.delete()
    else:
        _raw("DELETE FROM tenants_tenant WHERE id = %s", [tenant.pk])
        _raw("SET CONSTRAINTS ALL IMMEDIATE")
    assert not PendingBound.objects.filter(tenant_id=tenant.pk).exists()
    assert not PendingBoundRaise.objects.filter(tenant_id=tenant.pk).exists()
