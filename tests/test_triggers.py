"""Wake-ups for the scheduler: coalesced into few django-q passes, never lost."""

from __future__ import annotations

import pytest
from django.db import transaction
from django_q.conf import Conf
from django_q.models import OrmQ

from scheduling import passes, triggers
from scheduling.choices import TaskStatus
from scheduling.models import SchedulerLock, Task
from scheduling.passes import run_pass, run_requested_pass
from scheduling.placement import Placement, Plan, Snapshot


@pytest.fixture
def queued_mode(monkeypatch):
    """async_task puts the pass on the ORM queue (what the q cluster reads)."""
    monkeypatch.setattr(Conf, "SYNC", False)


def wake_flag() -> bool:
    return SchedulerLock.objects.get(name=triggers.WAKE_ROW).pass_requested


def test_a_thousand_requests_in_one_transaction_queue_one_pass(db, queued_mode, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks, transaction.atomic():
        for i in range(1000):
            triggers.request_pass(f"task {i} submitted")

    assert len(callbacks) == 1
    assert OrmQ.objects.count() == 1
    assert wake_flag()


def test_a_burst_of_separate_requests_queues_one_pass_until_a_pass_starts(db, queued_mode,
                                                                         django_capture_on_commit_callbacks):
    for i in range(200):
        with django_capture_on_commit_callbacks(execute=True):
            triggers.request_pass(f"task {i} submitted")
    assert OrmQ.objects.count() == 1

    run_pass(schedule=lambda snapshot: Plan())  # clears the flag as it starts
    assert not wake_flag()
    with django_capture_on_commit_callbacks(execute=True):
        triggers.request_pass("one more")
    assert OrmQ.objects.count() == 2


def test_a_rolled_back_change_sends_no_wake_up(db, queued_mode, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        try:
            with transaction.atomic():
                triggers.request_pass("submitted, then rolled back")
                raise RuntimeError
        except RuntimeError:
            pass
    assert OrmQ.objects.count() == 0
    assert not wake_flag()


def test_a_queued_pass_is_skipped_when_a_pass_ran_since_the_request(db, queued_mode,
                                                                    django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        triggers.request_pass("submitted")
    run_pass(schedule=lambda snapshot: Plan())

    assert run_requested_pass("submitted").startswith("skipped")


def test_with_a_synchronous_q_cluster_a_submit_is_placed_through_django_q(acme, servers, monkeypatch,
                                                                         django_capture_on_commit_callbacks):
    monkeypatch.setattr(Conf, "SYNC", True)
    gpu = servers[0].gpus.get(index=0)

    def place_everything(snapshot: Snapshot) -> Plan:
        return Plan(placements=[Placement(p.id, servers[0].pk, (gpu.pk,), 1000, True) for p in snapshot.pending])

    monkeypatch.setattr(passes, "_default_schedule", lambda: place_everything)
    with django_capture_on_commit_callbacks(execute=True):
        task = Task.objects.create(tenant=acme, name="job", command="true")
        triggers.request_pass(f"task {task.pk} submitted")

    task.refresh_from_db()
    assert task.status == TaskStatus.ASSIGNED
    assert not wake_flag()


def test_a_failed_wake_up_after_commit_is_logged_not_raised(db, monkeypatch, caplog,
                                                            django_capture_on_commit_callbacks):
    def broken(reason: str) -> bool:
        raise RuntimeError("database went away")

    monkeypatch.setattr(triggers, "wake", broken)
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        triggers.request_pass("task submitted")
    assert "Error calling scheduling.triggers.request_pass in on_commit()" in caplog.text
    assert "database went away" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_wake_up_that_enqueues_a_pass_keeps_the_callers_connection(queued_mode):
    """django-q's ORM broker closes connections older than CONN_MAX_AGE before it enqueues,
    unless it runs in a transaction; at 0 that was every caller's connection, so each
    enqueuing wake-up reconnected (a new PostgreSQL backend) on the submit's path."""
    from django.db import connection

    assert connection.settings_dict["CONN_MAX_AGE"] == 0  # the case that closed it
    triggers.clear_request()
    connection.ensure_connection()
    before = connection.connection

    assert triggers.wake("task 1 submitted")

    assert connection.connection is before
    assert OrmQ.objects.count() == 1
    assert wake_flag()


def _wake_row_xmax() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT xmax::text::bigint FROM scheduling_schedulerlock WHERE name = %s", [triggers.WAKE_ROW])
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_a_wake_up_while_a_pass_is_requested_neither_locks_nor_writes_the_row(queued_mode):
    """Under a burst of submits the flag is set: each wake-up only notifies. (The upsert this
    replaced locked the row every time, which made every wake-up a write.)"""
    assert triggers.wake("first")  # flips the flag and enqueues
    before = _wake_row_xmax()

    assert not triggers.wake("second")
    assert not triggers.wake("third")

    assert _wake_row_xmax() == before
    assert OrmQ.objects.count() == 1
    assert wake_flag()


@pytest.mark.django_db(transaction=True)
def test_a_wake_up_makes_the_row_should_it_be_missing(queued_mode):
    SchedulerLock.objects.filter(name=triggers.WAKE_ROW).delete()

    assert triggers.wake("submitted")  # made with the flag set: counts as the flip, enqueues

    assert wake_flag()
    assert OrmQ.objects.count() == 1
    assert not triggers.wake("again")
