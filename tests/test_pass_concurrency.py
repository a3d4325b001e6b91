"""Passes from several real OS processes against one PostgreSQL, one of them killed
mid-pass: no GPU is ever given twice, no task allocated twice, nothing left without a reason."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from scheduling.choices import ShareMode, TaskStatus
from scheduling.models import SchedulerLock, Task
from scheduling.passes import run_pass
from tenants.choices import Priority, WorkloadClass
from tenants.models import Quota, Tenant
from tests.conftest import make_server, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


def build_cluster(tasks: int, servers: int) -> None:
    tenants = []
    for i in range(4):
        tenant = Tenant.objects.create(name=f"Lab {i}", slug=f"lab{i}")
        Quota.objects.create(tenant=tenant, max_gpus=100, max_gpu_memory_mb=100 * 81_559, max_running_tasks=200,
                             max_pending_tasks=5000)
        tenants.append(tenant)
    for i in range(servers):
        make_server(f"c-{i:03d}")
    rng = random.Random(7)
    Task.objects.bulk_create(
        Task(tenant=rng.choice(tenants), name=f"job-{i}", command="python train.py",
             gpu_count=rng.choice((1, 1, 1, 2, 4)), gpu_memory_mb=rng.choice((8_000, 20_000, 40_000)),
             share_mode=ShareMode.SHARED if rng.random() < 0.2 else ShareMode.EXCLUSIVE,
             priority=rng.choice(list(Priority.values)),
             workload_class=WorkloadClass.ONLINE if rng.random() < 0.5 else WorkloadClass.BATCH)
        for i in range(tasks)
    )


def start(name: str, passes: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tests/pass_worker.py", name, str(passes), *flags], cwd=ROOT,
                            env=subprocess_env(Q_SYNC="false", PORTAL_PROCESS_NAME=f"pass-worker-{name}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip())
        if marker in line:
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {marker!r} from the worker:\n" + "\n".join(lines[-30:]))


def query(sql: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_four_processes_one_killed_mid_pass_never_give_a_gpu_twice(db):
    build_cluster(tasks=2000, servers=25)  # 200 GPUs

    victim = start("victim", 5, "--hang-mid-pass")
    workers = [start(f"w{i}", 6) for i in range(3)]
    try:
        read_until(victim, "MIDPASS", 120)
        # The victim holds the lock with uncommitted allocations; kill it there.
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        for worker in workers:
            print("\n".join(read_until(worker, "DONE", 120)))
            assert worker.wait(30) == 0
    finally:
        for proc in (victim, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # The lock is free again (it died with the victim's connection) and a last pass settles the queue.
    assert SchedulerLock.objects.filter(name="scheduler").exists()
    result = run_pass(actor="test")

    assert query("""SELECT gpu_id FROM scheduling_allocation WHERE released_at IS NULL AND exclusive
                    GROUP BY gpu_id HAVING count(*) > 1""") == []
    assert query("""SELECT a.gpu_id FROM scheduling_allocation a JOIN nodes_gpu g ON g.id = a.gpu_id
                    WHERE a.released_at IS NULL GROUP BY a.gpu_id, g.memory_total_mb
                    HAVING sum(a.memory_mb) > g.memory_total_mb""") == []
    # Active tasks hold exactly their GPUs on one server; nobody else holds any.
    assert query("""SELECT t.id FROM scheduling_task t
                    LEFT JOIN scheduling_allocation a ON a.task_id = t.id AND a.released_at IS NULL
                    GROUP BY t.id, t.status, t.gpu_count
                    HAVING (t.status IN ('assigned', 'running') AND (count(a.id) <> t.gpu_count
                                                                   OR count(DISTINCT a.node_id) <> 1))
                        OR (t.status NOT IN ('assigned', 'running') AND count(a.id) > 0)""") == []
    # Each placement of a task is one pending -> assigned event: one per attempt at most.
    assert query("""SELECT t.id FROM scheduling_task t JOIN scheduling_taskevent e ON e.task_id = t.id
                    WHERE e.to_status = 'assigned' GROUP BY t.id, t.attempt HAVING count(*) > t.attempt + 1""") == []
    pending = Task.objects.filter(status=TaskStatus.PENDING)
    assert not pending.filter(pending_reason="").exists()
    assert not pending.filter(queue_position__isnull=True).exists()
    assert Task.objects.filter(status=TaskStatus.SUCCEEDED).count() > 0
    assert result.pending == pending.count()
