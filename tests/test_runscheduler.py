"""``manage.py runscheduler`` as a real process against the test database:
woken by NOTIFY, no lost wake-ups, SIGTERM finishes the pass in progress."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django_q.conf import Conf

from kernel.models import ControlPlaneServer
from scheduling import triggers
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from scheduling.placement import Placement, Plan, Snapshot
from tests.conftest import database_url, subprocess_env, wait_for

BASE_DIR = Path(settings.BASE_DIR)
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def queued_q_passes(monkeypatch):
    """Submits here only queue their django-q pass: the runscheduler process must do the work
    (and a synchronous q pass could wait on the lock a test holds)."""
    monkeypatch.setattr(Conf, "SYNC", False)


class Scheduler:
    def __init__(self, proc: subprocess.Popen, log: Path, app_name: str) -> None:
        self.proc, self.log, self.app_name = proc, log, app_name

    def output(self) -> str:
        return self.log.read_text()


@contextmanager
def runscheduler(tmp_path: Path, *args: str) -> Iterator[Scheduler]:
    app_name = f"sched-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / f"{app_name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "runscheduler", *args], cwd=BASE_DIR, stdout=out, stderr=subprocess.STDOUT,
            env=subprocess_env(PORTAL_PROCESS_NAME=app_name, Q_SYNC="false"),
        )
    sched = Scheduler(proc, log, app_name)
    try:
        # Ready once its first pass (the catch-up pass at start) is logged.
        wait_for(lambda: "pass: placed" in sched.output() or proc.poll() is not None, 60, "runscheduler to start")
        assert proc.poll() is None, sched.output()
        yield sched
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def submit(tenant, name: str = "job") -> Task:
    with transaction.atomic():
        task = Task.objects.create(tenant=tenant, name=name, command="python train.py", gpu_count=1,
                                   gpu_memory_mb=10_000)
        triggers.request_pass(f"task {task.pk} submitted")
    return task


def status_of(task: Task) -> str:
    return Task.objects.values_list("status", flat=True).get(pk=task.pk)


def test_runscheduler_once_places_the_waiting_tasks_and_exits(acme, servers, tmp_path):
    task = Task.objects.create(tenant=acme, name="job", command="true", gpu_memory_mb=10_000)

    done = subprocess.run([sys.executable, "manage.py", "runscheduler", "--once"], cwd=BASE_DIR, capture_output=True,
                          text=True, env=subprocess_env(), timeout=60)

    assert done.returncode == 0, done.stderr
    assert "pass: placed 1" in done.stderr
    assert status_of(task) == TaskStatus.ASSIGNED


def test_a_submit_wakes_the_scheduler_at_once_without_waiting_for_its_poll(acme, servers, tmp_path):
    # A one-minute poll: only the NOTIFY can get the task placed within the deadline.
    with runscheduler(tmp_path, "--poll-interval-ms", "60000") as sched:
        task = submit(acme)
        wait_for(lambda: status_of(task) == TaskStatus.ASSIGNED, 15, "the task to be placed")

        registered = ControlPlaneServer.objects.get(role="scheduler", pid=sched.proc.pid)
        assert registered.info["poll_interval_ms"] == 60000
        sched.proc.send_signal(signal.SIGTERM)
        assert sched.proc.wait(10) == 0
    assert "stopped after" in sched.output()


def test_a_task_submitted_during_a_pass_is_placed_by_the_next_pass(acme, servers, tmp_path):
    first = Task.objects.create(tenant=acme, name="first", command="true", gpu_memory_mb=10_000)
    gpu = servers[0].gpus.get(index=0)
    late: list[Task] = []

    def submit_meanwhile(snapshot: Snapshot) -> Plan:
        # This pass holds the lock and has read the queue; a submit commits now.
        def other_request() -> None:
            try:
                late.append(submit(acme, "late"))
            finally:
                connection.close()

        thread = threading.Thread(target=other_request)
        thread.start()
        thread.join()
        assert late[0].pk not in {p.id for p in snapshot.pending}
        return Plan(placements=[Placement(first.pk, servers[0].pk, (gpu.pk,), 10_000, True)])

    with runscheduler(tmp_path, "--poll-interval-ms", "60000"):
        run_pass(actor="test", schedule=submit_meanwhile)
        assert status_of(first) == TaskStatus.ASSIGNED
        wait_for(lambda: status_of(late[0]) == TaskStatus.ASSIGNED, 15, "the late task to be placed")


def test_sigterm_lets_the_pass_in_progress_finish_before_exiting(acme, servers, tmp_path):
    with runscheduler(tmp_path, "--poll-interval-ms", "60000") as sched:
        # Hold the scheduler lock ourselves, so the pass the submit wakes is caught in progress.
        with psycopg.connect(database_url()) as holder:
            holder.execute("SELECT id FROM scheduling_schedulerlock WHERE name = 'scheduler' FOR UPDATE")
            task = submit(acme)
            wait_for(lambda: holder.execute(
                "SELECT 1 FROM pg_stat_activity WHERE split_part(application_name, ' ', 1) = %s "
                "AND wait_event_type = 'Lock'",
                [sched.app_name]).fetchone(), 15, "the scheduler's pass to wait for the lock")
            sched.proc.send_signal(signal.SIGTERM)
            holder.rollback()

        assert sched.proc.wait(15) == 0
    assert status_of(task) == TaskStatus.ASSIGNED
    assert Allocation.objects.filter(task=task, released_at__isnull=True).count() == 1
    assert "received SIGTERM" in sched.output()


def test_unwoken_passes_over_a_stuck_queue_back_off_up_to_the_cap():
    from scheduling.management.commands.runscheduler import next_idle_backoff

    waits, current = [], 0.0
    for _ in range(8):
        current = next_idle_backoff(current, placed=False, poll_s=0.1, cap_s=5)
        waits.append(current)
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5]
    assert next_idle_backoff(5, placed=True, poll_s=0.1, cap_s=5) == 0.0
