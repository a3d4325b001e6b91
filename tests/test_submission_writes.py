"""A submit's writes: the quota lock, then one statement for the tasks, their events
and the pending count; the same rows as the ORM would write, and all or nothing."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from scheduling import submission
from scheduling.models import Task, TaskEvent
from tenants.choices import Priority
from tenants.models import Quota


def specs(ctx, n: int) -> list[submission.TaskSpec]:
    out = []
    for i in range(n):
        spec, errors = submission.validate({"tenant": "acme", "name": f"t{i}", "command": "python train.py",
                                            "env": {"SEED": str(i)}, "node_selector": {"zone": "a"}}, ctx)
        assert not errors
        out.append(spec)
    return out


def test_a_batch_is_written_by_one_statement_after_the_quota_lock(alice, servers):
    ctx = submission.SubmitContext.load(alice)
    with CaptureQueriesContext(connection) as queries:
        tasks = submission.create_tasks(ctx, specs(ctx, 3))

    writes = [q["sql"] for q in queries.captured_queries if "INSERT" in q["sql"] and "scheduling_task" in q["sql"]]
    assert len(writes) == 1
    stored = {t.pk: t for t in Task.objects.filter(pk__in=[t.pk for t in tasks])}
    for i, task in enumerate(tasks):
        row = stored[task.pk]
        assert (row.name, row.env, row.node_selector, row.status, row.submitter_id) == \
            (f"t{i}", {"SEED": str(i)}, {"zone": "a"}, "pending", alice.pk)
        assert row.created_at == task.created_at and row.updated_at is not None
        event = TaskEvent.objects.get(task=task)
        assert (event.from_status, event.to_status, event.actor, event.reason) == \
            ("", "pending", "user:alice", "submitted")


def test_a_batch_over_the_pending_limit_leaves_neither_tasks_nor_events(alice, acme, servers):
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=4)
    ctx = submission.SubmitContext.load(alice)
    submission.create_tasks(ctx, specs(ctx, 3))
    with pytest.raises(submission.SubmitError) as refused:
        submission.create_tasks(ctx, specs(ctx, 2))

    assert "it has 3, this adds 2" in refused.value.errors["tenant"][0]
    assert Task.objects.filter(tenant=acme).count() == 3
    assert TaskEvent.objects.filter(task__tenant=acme).count() == 3


@pytest.mark.parametrize("removed", ["quota", "tenant"])
def test_a_tenant_or_quota_removed_after_the_check_is_refused_with_nothing_written(alice, acme, servers, removed):
    ctx = submission.SubmitContext.load(alice)
    checked = specs(ctx, 2)
    # An operator removes the quota (or the tenant, and with it the quota) between the
    # request's check and its write.
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM tenants_quota WHERE tenant_id = %s", [acme.pk])
        if removed == "tenant":
            cursor.execute("DELETE FROM tenants_membership WHERE tenant_id = %s", [acme.pk])
            cursor.execute("DELETE FROM tenants_tenant WHERE id = %s", [acme.pk])
    with pytest.raises(submission.SubmitError) as refused:
        submission.create_tasks(ctx, checked)

    assert refused.value.errors == {"tenant": ["Tenant acme has no quota yet; ask an operator to set one."]}
    assert not Task.objects.filter(tenant_id=acme.pk).exists()


def test_the_submit_context_is_one_query_with_tenants_quotas_and_cluster_limits(alice, carol, globex, staff, servers):
    from tenants.models import Membership

    Membership.objects.create(user=alice, tenant=globex)
    Quota.objects.filter(tenant=globex).delete()
    submission.SubmitContext.load(alice)  # the limits as of this GPU inventory, kept by this process
    with CaptureQueriesContext(connection) as queries:
        ctx = submission.SubmitContext.load(alice)
    assert len(queries.captured_queries) == 1
    assert sorted(ctx.memberships) == ["acme", "globex"]
    acme = ctx.memberships["acme"]
    assert acme.quota == Quota.objects.get(tenant=acme) and acme.quota.max_priority == Quota.objects.get(
        tenant=acme).max_priority
    assert submission._quota(ctx.memberships["globex"]) is None  # no quota: refused by validate, as before
    assert (ctx.limits.max_gpus_per_server, ctx.limits.largest_gpu_mb) == (8, 81_559)

    nobody = submission.SubmitContext.load(staff)  # staff, member of no tenant: the limits all the same
    assert nobody.memberships == {} and nobody.limits == ctx.limits


def prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements ORDER BY name")
        return [row[0] for row in cursor.fetchall()]


def test_a_submits_statements_are_prepared_once_and_then_reused(alice, servers, django_capture_on_commit_callbacks):
    before = set(prepared_statements())

    def submit() -> list[str]:
        with django_capture_on_commit_callbacks(execute=True):  # the wake-up after commit too
            ctx = submission.SubmitContext.load(alice)
            submission.create_tasks(ctx, specs(ctx, 1))
        return [s for s in prepared_statements() if s not in before]

    first = submit()
    assert submit() == first and submit() == first
    # The context, the quota lock, the insert, the scheduler's wake-up: one statement each.
    marks = ("tenants_membership", "FOR UPDATE", 'INSERT INTO "scheduling_task"', "pg_notify")
    assert sorted([mark in s for mark in marks].index(True) for s in first) == [0, 1, 2, 3]
    assert Task.objects.filter(submitter=alice).count() == 3


def test_a_submits_prepared_statements_settle_on_a_generic_plan(alice, globex, servers,
                                                                django_capture_on_commit_callbacks):
    """PostgreSQL plans a prepared statement for its values five times, then keeps one generic
    plan unless that looks dearer. Each of these looked dearer and was planned afresh on every
    submit: the quota lock as "= ANY(array of one)" (ten rows and a sort, estimated), and the
    insert, while its pending count was a subquery and the statistics showed a queue of other
    tenants' tasks (the count looked nearly free for this tenant, dear for any)."""
    queued = Task.objects.create(tenant=globex, name="queued", command="true", status="pending")
    columns = ", ".join(f.column for f in Task._meta.concrete_fields if not f.primary_key and not f.generated)
    with connection.cursor() as cursor:  # 20,000 copies of it, then the statistics that see them
        cursor.execute(f"INSERT INTO scheduling_task ({columns}) SELECT {columns} FROM scheduling_task, "  # noqa: S608
                       "generate_series(1, 20000) WHERE id = %s", [queued.pk])
        cursor.execute("ANALYZE scheduling_task")
    before = set(prepared_statements())
    for _ in range(12):
        with django_capture_on_commit_callbacks(execute=True):
            ctx = submission.SubmitContext.load(alice)
            submission.create_tasks(ctx, specs(ctx, 1))
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
        plans = {statement: (generic, custom) for statement, generic, custom in cursor.fetchall()
                 if statement not in before}

    assert any("FOR UPDATE" in statement for statement in plans)
    replanned = {statement[:80]: counts for statement, counts in plans.items() if counts[0] == 0}
    assert replanned == {}


def test_a_batch_across_tenants_locks_each_tenants_quota_and_writes_all(alice, acme, globex, servers):
    from tenants.models import Membership

    Membership.objects.create(user=alice, tenant=globex)
    Quota.objects.filter(tenant=globex).update(max_pending_tasks=1)
    ctx = submission.SubmitContext.load(alice)
    both = [*specs(ctx, 1), submission.validate({"tenant": "globex", "name": "g", "command": "true"}, ctx)[0]]
    with CaptureQueriesContext(connection) as queries:
        submission.create_tasks(ctx, both)

    locks = [q["sql"] for q in queries.captured_queries if "FOR UPDATE" in q["sql"]]
    assert len(locks) == 1 and "ANY" in locks[0]
    assert sorted(Task.objects.values_list("tenant__slug", flat=True)) == ["acme", "globex"]
    with pytest.raises(submission.SubmitError) as refused:  # globex's limit of 1 is held, acme's is not
        submission.create_tasks(ctx, both)
    assert "Tenant globex would have more than 1 pending tasks" in refused.value.errors["tenant"][0]
    assert Task.objects.count() == 2


def test_a_refused_submit_leaves_the_next_one_on_the_same_connection_working(alice, acme, servers):
    """A rollback makes psycopg forget (and deallocate) the connection's prepared statements:
    the next submit prepares them again rather than naming one that is gone."""
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=1)
    ctx = submission.SubmitContext.load(alice)
    submission.create_tasks(ctx, specs(ctx, 1))
    with pytest.raises(submission.SubmitError):
        submission.create_tasks(ctx, specs(ctx, 1))
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=10)

    ctx = submission.SubmitContext.load(alice)
    submission.create_tasks(ctx, specs(ctx, 1))
    assert Task.objects.filter(tenant=acme).count() == 2


def test_with_prepared_statements_off_nothing_is_prepared(alice, servers, monkeypatch):
    """DB_PREPARED_STATEMENTS=false (PgBouncer in transaction mode before 1.21) leaves psycopg's
    preparing off, as Django does: the same statements run bound on the client."""
    before = prepared_statements()
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)
    with CaptureQueriesContext(connection) as queries:
        ctx = submission.SubmitContext.load(alice)
        submission.create_tasks(ctx, specs(ctx, 1))

    assert prepared_statements() == before
    assert any('INSERT INTO "scheduling_task"' in q["sql"] for q in queries.captured_queries)
    assert Task.objects.filter(submitter=alice).count() == 1


def test_the_cluster_limits_are_read_again_exactly_when_the_gpu_inventory_changed(alice, servers):
    from nodes.models import GPU

    from .conftest import make_server

    def load() -> tuple[tuple[int, int, int], int]:
        """(most GPUs on a server, largest GPU, servers with GPUs), and the queries it took."""
        with CaptureQueriesContext(connection) as queries:
            limits = submission.SubmitContext.load(alice).limits
        return (limits.max_gpus_per_server, limits.largest_gpu_mb, limits.servers), len(queries.captured_queries)

    load()
    assert load() == ((8, 81_559, 2), 1)

    # What every heartbeat writes (the same memory size, new metrics) changes nothing.
    GPU.objects.filter(node=servers[0]).update(memory_used_mb=500, memory_total_mb=81_559)
    assert load()[1] == 1

    # A bigger server joins; a GPU reports another size (a raw statement counts as the ORM);
    # a server's GPUs are removed: each is seen by the very next submit.
    make_server("gpu-big", gpus=16, memory_mb=141_000)
    assert load() == ((16, 141_000, 3), 2)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE nodes_gpu SET memory_total_mb = 183000 WHERE node_id = %s AND index = 0",
                       [servers[1].pk])
    assert load() == ((16, 183_000, 3), 2)
    GPU.objects.filter(node__name="gpu-big").delete()
    assert load() == ((8, 183_000, 2), 2)
    assert load()[1] == 1


def test_a_submit_inside_an_audit_context_runs_its_statements_unprepared(alice, servers):
    """The audit (pghistory's context: the portal's form, the admin) prefixes each write with a
    second statement, which a prepared statement cannot hold: the submit still goes through."""
    import pghistory

    before = prepared_statements()
    with pghistory.context(source="portal"):
        ctx = submission.SubmitContext.load(alice)
        tasks = submission.create_tasks(ctx, specs(ctx, 2))

    assert Task.objects.filter(pk__in=[t.pk for t in tasks]).count() == 2
    assert prepared_statements() == before


def test_a_batchs_insert_is_not_kept_prepared(alice, servers):
    """Its text grows with the batch's size: each size kept prepared would be another plan on the server."""
    before = prepared_statements()
    ctx = submission.SubmitContext.load(alice)
    submission.create_tasks(ctx, specs(ctx, 3))

    assert not any('INSERT INTO "scheduling_task"' in s for s in prepared_statements() if s not in before)
    assert Task.objects.filter(submitter=alice).count() == 3


def test_single_submits_reuse_one_insert_text_and_store_each_tasks_own_values(alice, servers):
    """The INSERT of one task is compiled once; later submits only bind their values."""
    ctx = submission.SubmitContext.load(alice)
    first, = submission.create_tasks(ctx, specs(ctx, 1))
    spec, errors = submission.validate({"tenant": "acme", "name": "second", "command": "python eval.py",
                                        "gpu_count": 2, "priority": "HIGH", "env": {"A": "1"}}, ctx)
    assert not errors
    second, = submission.create_tasks(ctx, [spec])

    stored = Task.objects.get(pk=second.pk)
    assert (stored.name, stored.command, stored.gpu_count, stored.priority, stored.env) == \
        ("second", "python eval.py", 2, Priority.HIGH, {"A": "1"})
    assert stored.created_at == second.created_at and stored.updated_at == second.updated_at
    assert stored.updated_at > Task.objects.get(pk=first.pk).updated_at  # auto_now ran for this one


def test_a_task_with_an_sql_expression_in_a_field_is_compiled_afresh(alice, acme, servers):
    from django.db import transaction
    from django.db.models import Value
    from django.db.models.functions import Concat

    from scheduling import lifecycle

    ctx = submission.SubmitContext.load(alice)
    submission.create_tasks(ctx, specs(ctx, 1))  # the plain text is kept now
    task = Task(tenant=acme, submitter=alice, status="pending", attempt=0, name=Concat(Value("ex"), Value("pr")),
                command="python x.py")
    with transaction.atomic(), lifecycle.batch() as fan:
        lifecycle.submit_many([task], actor="user:alice", limits={acme.pk: 100}, fan=fan)
    assert Task.objects.get(pk=task.pk).name == "expr"
