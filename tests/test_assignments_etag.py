"""The assignments ETag every heartbeat and long poll reads: what it covers, and that it reads
its own server's tasks, not every active task of the cluster."""

from __future__ import annotations

import pytest
from django.db import connection

from scheduling.assignments import current_etag, desired_state
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskRank
from tests.conftest import make_server

pytestmark = pytest.mark.django_db


def task_rows_read() -> int:
    """Rows of the task table this transaction has read so far, by scans and index fetches."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
                       "FROM pg_stat_xact_user_tables WHERE relname = 'scheduling_task'")
        return cursor.fetchone()[0]


def test_the_etag_reads_its_own_servers_tasks_and_gangs_ranked_there(acme):
    here, busy = make_server("etag-here", gpus=8), make_server("etag-busy", gpus=8)
    mine = Task.objects.create(tenant=acme, name="mine", command="true", status=TaskStatus.RUNNING, node=here)
    gang = Task.objects.create(tenant=acme, name="gang", command="true", status=TaskStatus.ASSIGNED, node=busy,
                               gpu_count=16, nodes=2, attempt=1)
    TaskRank.objects.create(task=gang, attempt=1, rank=1, node=here)
    TaskRank.objects.create(task=gang, attempt=0, rank=0, node=busy)  # an earlier attempt's: not this server's
    Task.objects.bulk_create(Task(tenant=acme, name=f"other-{i}", command="true", status=TaskStatus.RUNNING,
                                  node=busy) for i in range(600))
    Task.objects.create(tenant=acme, name="done", command="true", status=TaskStatus.SUCCEEDED, node=here)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE scheduling_task, scheduling_taskrank")

    before = task_rows_read()
    etag = current_etag(here.pk)
    read = task_rows_read() - before

    state = desired_state(here.pk)
    assert [t["id"] for t in state["tasks"]] == [mine.pk, gang.pk]
    assert etag == state["etag"]
    # Its two tasks (and the gang's row once more, through its rank), not the other server's 600.
    assert read <= 10, f"the ETag read {read} task rows"
