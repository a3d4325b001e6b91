"""Allocation intervals never overlap on a GPU (usage accounting sums them): stamped
by the database's clock, and refused by the database when they would overlap."""

from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.utils import timezone

from scheduling.choices import TaskStatus
from scheduling.lock import lock_scheduler
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from tests.conftest import make_server


def _task(tenant, name="t", **kw) -> Task:
    return Task.objects.create(tenant=tenant, name=name, command="true", **kw)


def test_the_database_refuses_an_exclusive_interval_overlapping_history(acme, servers):
    gpu = servers[0].gpus.get(index=0)
    t0 = timezone.now() - timedelta(minutes=10)
    Allocation.objects.create(task=_task(acme, "first"), gpu=gpu, node=gpu.node, memory_mb=1, allocated_at=t0,
                              released_at=t0 + timedelta(seconds=10))
    with pytest.raises(IntegrityError, match="allocation_exclusive_intervals_never_overlap"), transaction.atomic():
        Allocation.objects.create(task=_task(acme, "second"), gpu=gpu, node=gpu.node, memory_mb=1,
                                  allocated_at=t0 + timedelta(seconds=9, milliseconds=990),
                                  released_at=t0 + timedelta(seconds=20))
    # Back to back is fine: intervals are half-open.
    Allocation.objects.create(task=_task(acme, "third"), gpu=gpu, node=gpu.node, memory_mb=1,
                              allocated_at=t0 + timedelta(seconds=10), released_at=t0 + timedelta(seconds=20))


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
