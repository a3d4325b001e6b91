"""The scheduler lock: passes, the sweep and reservation changes anywhere in the cluster
serialise on one PostgreSQL row lock (``SchedulerLock`` named "scheduler"), taken with
``SELECT ... FOR UPDATE`` inside the caller's transaction. A crashed holder's lock dies
with its connection: no TTLs, no clocks."""

from __future__ import annotations

from datetime import datetime

from django.db import connection
from django.db.models.functions import Now

from scheduling.models import SchedulerLock

LOCK_NAME = "scheduler"

# The scheduler lock's holder, made visible in pg_locks (advisory, transaction-scoped):
# taken right after the row lock, so it is never contended, and released with it at
# commit, rollback or a dead connection. Operators read who holds it, and since when,
# from PostgreSQL itself (kernel.control_plane), not from a row the holder writes.
SCHEDULER_ADVISORY_KEY = 0x5C4ED


# With a holder name, one round trip: the UPDATE takes the row lock (waiting for a holder as
# SELECT ... FOR UPDATE would) and records the holder; the advisory lock is taken after it, in
# the outer SELECT. acquired_at is the statement's start, as Now() is in the two-step form.
_LOCK_AS_SQL = """
WITH locked AS (
    UPDATE scheduling_schedulerlock SET holder = %s, acquired_at = statement_timestamp()
    WHERE id = (SELECT id FROM scheduling_schedulerlock WHERE name = %s ORDER BY id LIMIT 1)
    RETURNING id, acquired_at
)
SELECT id, acquired_at, pg_advisory_xact_lock(%s) FROM locked
"""


# The same statement with named parameters, to lead a batch of reads in one round trip
# (scheduling.passes.load_snapshot): the reads after it run once it holds the lock, and
# statement_timestamp(), the acquired_at it returns, is the same for every statement of the batch.
LOCK_IN_BATCH_SQL = """
WITH locked AS (
    UPDATE scheduling_schedulerlock SET holder = %(lock_holder)s, acquired_at = statement_timestamp()
    WHERE id = (SELECT id FROM scheduling_schedulerlock WHERE name = %(lock_name)s ORDER BY id LIMIT 1)
    RETURNING id, acquired_at
)
SELECT id, acquired_at, pg_advisory_xact_lock(%(lock_key)s) FROM locked
"""


def lock_in_batch_params(holder: str) -> dict:
    """The parameters of ``LOCK_IN_BATCH_SQL``. Its batch returns no row when the lock row is
    missing: then nothing was locked, and the caller takes the lock with ``lock_scheduler``."""
    return {"lock_holder": holder[:200], "lock_name": LOCK_NAME, "lock_key": SCHEDULER_ADVISORY_KEY}


def lock_scheduler(holder: str | None = None) -> tuple[int, datetime]:
    """Take the scheduler lock (inside the pass's transaction); return its id and DB time.
    ``holder``: also record who holds it (the row's ``holder`` and ``acquired_at``)."""
    if holder is not None:
        with connection.cursor() as cursor:
            cursor.execute(_LOCK_AS_SQL, [holder[:200], LOCK_NAME, SCHEDULER_ADVISORY_KEY])
            row = cursor.fetchone()
        if row is not None:
            return row[0], row[1]
        SchedulerLock.objects.get_or_create(name=LOCK_NAME)
        return lock_scheduler(holder)
    locked = (SchedulerLock.objects.select_for_update().filter(name=LOCK_NAME).order_by("pk")
              .annotate(db_now=Now()).values_list("pk", "db_now"))
    try:
        held = locked.get()
    except SchedulerLock.DoesNotExist:
        # Migration 0001 creates the row; recreate it if it was deleted (e.g. a table flush).
        SchedulerLock.objects.get_or_create(name=LOCK_NAME)
        held = locked.get()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEDULER_ADVISORY_KEY])
    return held
