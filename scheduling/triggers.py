"""Ask for a scheduling pass after the current transaction commits.

Call ``request_pass(reason)`` after anything that may free GPUs or need them:
a submit, a finish, a cancel, a server joining or leaving. Wake-ups are sent
after commit (nobody schedules from a rolled-back state): a Postgres NOTIFY on
``scheduler_wake`` wakes ``runscheduler`` at once.
"""

from __future__ import annotations

from django.db import connection, transaction

WAKE_CHANNEL = "scheduler_wake"


def _notify(reason: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [WAKE_CHANNEL, reason[:200]])


def request_pass(reason: str) -> None:
    transaction.on_commit(lambda: _notify(reason))
