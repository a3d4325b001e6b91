"""The pending-task limit holds when several processes submit at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection

from scheduling.choices import TaskStatus
from scheduling.models import Task
from tenants.models import Quota
from tests.conftest import database_url, subprocess_env

ROOT = Path(__file__).resolve().parent.parent

SUBMITTER = """
import os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup()
from django.contrib.auth import get_user_model
from scheduling import submission
user = get_user_model().objects.get(username="alice")
ctx = submission.SubmitContext.load(user)
spec, errors = submission.validate({"tenant": "acme", "command": "python x.py"}, ctx)
assert not errors, errors
print("ready", flush=True)
made = refused = 0
for _ in range(4):
    try:
        submission.create_tasks(ctx, [spec, spec])
        made += 2
    except submission.SubmitError:
        refused += 1
print(made, refused)
"""


def _sessions_waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_concurrent_submitters_never_exceed_the_pending_limit(acme, alice, servers):
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=5)
    # Hold task inserts back (reads still go through) until all four submitters are
    # inside their transactions: without the quota row lock they would all count
    # 0 pending at once and together insert 8 tasks.
    with psycopg.connect(database_url()) as blocker:
        blocker.execute("LOCK TABLE scheduling_task IN SHARE ROW EXCLUSIVE MODE")
        procs = [subprocess.Popen([sys.executable, "-c", SUBMITTER], cwd=ROOT, env=subprocess_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        deadline = time.monotonic() + 60
        while _sessions_waiting_on_locks() < 4:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the submitters never reached the database"
            time.sleep(0.05)
        blocker.rollback()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(tuple(int(x) for x in out.split()[-2:]))
    # 4 processes x 4 attempts x 2 tasks; batches are all-or-none, so 2 batches fit under 5.
    assert Task.objects.filter(tenant=acme, status=TaskStatus.PENDING).count() == 4
    assert sum(made for made, _ in results) == 4
    assert sum(refused for _, refused in results) == 14
