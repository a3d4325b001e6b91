"""Allocation intervals never overlap on a GPU (usage accounting sums them): stamped
by the database's clock, and refused by the database when they would overlap."""

from __future__ import annotations

import dataclasses
import importlib
import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.utils import timezone

from scheduling.choices import ShareMode, TaskStatus
from scheduling.lock import lock_scheduler
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from tests.conftest import make_server


def _task(tenant, name="t", **kw) -> Task:
    return Task.objects.create(tenant=tenant, name=name, command="true", **kw)


def test_the_database_refuses_an_exclusive_interval_overlapping_history(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    t0 = timezone.now() - timedelta(minutes=10)
    _exclusive(acme, gpu, "first", t0, t0 + timedelta(seconds=10))
    with pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic():
        _exclusive(acme, gpu, "second", t0 + timedelta(seconds=9, milliseconds=990), t0 + timedelta(seconds=20))
    # Back to back is fine: intervals are half-open.
    _exclusive(acme, gpu, "third", t0 + timedelta(seconds=10), t0 + timedelta(seconds=20))


def test_no_shared_interval_overlaps_an_exclusive_one_in_history_either(acme, servers):
    gpu = servers[0].gpus.get(index=1)
    t0 = timezone.now() - timedelta(minutes=10)
    _exclusive(acme, gpu, "exclusive", t0, t0 + timedelta(seconds=10))
    with pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic():
        _shared(acme, gpu, t0 + timedelta(seconds=5), t0 + timedelta(seconds=15))
    # Shared intervals may overlap one another; none may reach back into the exclusive one.
    _shared(acme, gpu, t0 + timedelta(seconds=10), t0 + timedelta(seconds=20))
    _shared(acme, gpu, t0 + timedelta(seconds=12), None)
    with pytest.raises(IntegrityError, match="allocation_exclusive_overlaps_nothing"), transaction.atomic():
        _exclusive(acme, gpu, "late", t0 + timedelta(seconds=30))


def _exclusive(tenant, gpu, name, start, end=None) -> Allocation:
    return Allocation.objects.create(task=_task(tenant, name), gpu=gpu, node=gpu.node, memory_mb=1, allocated_at=start,
                                     released_at=end)


def _shared(tenant, gpu, start, end) -> Allocation:
    return Allocation.objects.create(task=_task(tenant, "shared", share_mode=ShareMode.SHARED), gpu=gpu, node=gpu.node,
                                     memory_mb=1, exclusive=False, allocated_at=start, released_at=end)


def test_the_migration_to_one_constraint_mends_history_stamped_by_process_clocks(acme, servers):
    """Rows from before intervals were stamped by the database may overlap by milliseconds:
    migration 0013 mends them, so its constraint can be added over them."""
    migration = importlib.import_module("scheduling.migrations.0013_one_exclusion_constraint_for_allocations")
    constraint, = (c for c in Allocation._meta.constraints if c.name == "allocation_exclusive_overlaps_nothing")
    with connection.schema_editor() as editor:
        editor.remove_constraint(Allocation, constraint)
    gpu, other, third = (servers[0].gpus.get(index=i) for i in (0, 1, 2))
    t0 = timezone.now() - timedelta(minutes=10)
    ms = timedelta(milliseconds=1)
    # A shared interval released 5 ms into the exclusive one placed after it (it ends where that begins),
    ran_over = _shared(acme, gpu, t0, t0 + 10_005 * ms)
    after = _exclusive(acme, gpu, "after", t0 + 10_000 * ms, t0 + 20_000 * ms)
    # an active shared one stamped 5 ms before the release of the exclusive one it followed (that ends
    # where it begins),
    before = _exclusive(acme, other, "before", t0, t0 + 10_000 * ms)
    skewed = _shared(acme, other, t0 + 9_995 * ms, None)
    # one stamped before the whole of a 2 ms exclusive task that it really followed (it begins where that
    # ended),
    fourth = servers[1].gpus.get(index=0)
    brief = _exclusive(acme, fourth, "brief", t0 + 1 * ms, t0 + 3 * ms)
    early = _shared(acme, fourth, t0, None)
    # and two shared ones overlapping, as they may.
    both = [_shared(acme, third, t0, t0 + 10_000 * ms), _shared(acme, third, t0 + 5_000 * ms, None)]

    with connection.cursor() as cursor:
        cursor.execute(migration.CLAMP_OVERLAPS)
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the rows' deferred checks, before the ALTER TABLE
    with connection.schema_editor() as editor:
        editor.add_constraint(Allocation, constraint)

    def interval(a: Allocation) -> tuple:
        a.refresh_from_db()
        return a.allocated_at, a.released_at

    assert interval(ran_over) == (t0, t0 + 10_000 * ms)
    assert interval(after) == (t0 + 10_000 * ms, t0 + 20_000 * ms)
    assert interval(before) == (t0, t0 + 9_995 * ms)
    assert interval(skewed) == (t0 + 9_995 * ms, None)
    assert interval(brief) == (t0 + 1 * ms, t0 + 3 * ms)
    assert interval(early) == (t0 + 3 * ms, None)
    assert [interval(a) for a in both] == [(t0, t0 + 10_000 * ms), (t0 + 5_000 * ms, None)]


@pytest.mark.django_db(transaction=True)
def test_a_pass_that_waited_for_the_lock_opens_its_interval_after_the_release_it_waited_for(acme, settings):
    """The pass stamps its allocation when it writes it, not when it started waiting."""
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=0.0, batch_share=1.0)
    node = make_server("one-gpu", gpus=1)
    gpu = node.gpus.get()
    old = _task(acme, "old", status=TaskStatus.RUNNING, node=node, started_at=timezone.now())
    Allocation.objects.create(task=old, gpu=gpu, node=node, memory_mb=1_000, allocated_at=timezone.now())
    new = _task(acme, "new", gpu_memory_mb=1_000)

    holding, pass_waiting = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def pass_behind_the_lock() -> None:
        try:
            holding.wait(10)
            pass_waiting.set()
            run_pass(actor="test")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            close_old_connections()

    thread = threading.Thread(target=pass_behind_the_lock)
    thread.start()
    with transaction.atomic():
        lock_scheduler()
        holding.set()
        pass_waiting.wait(10)
        # Let the pass's statement start (and block on the lock) before the release.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.3)")
        Task.locked(old.pk).finish(exit_code=0, actor="test")
    thread.join(20)

    assert not errors, errors
    new.refresh_from_db()
    assert new.status == TaskStatus.ASSIGNED, new.pending_reason
    released = Allocation.objects.get(task=old).released_at
    allocated = Allocation.objects.get(task=new).allocated_at
    assert allocated >= released
