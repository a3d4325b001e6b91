"""Ask for a scheduling pass after the current transaction commits.

Call ``request_pass(reason)`` after anything that may free GPUs or need them:
a submit, a finish, a cancel, a server joining or leaving. Wake-ups are sent
after commit (nobody schedules from a rolled-back state), in one statement:

- ``NOTIFY scheduler_wake`` wakes ``runscheduler`` at once;
- the ``pass_requested`` flag on the ``SchedulerLock`` row named "wake" is set
  with a conditional update, and only the request that flips it from false to
  true enqueues a django-q2 task running a pass. (A separate row from the
  "scheduler" lock row, so that flipping it never waits for a running pass.) Every pass clears the flag as
  it starts, before it takes the lock and reads the queue, so a request that
  finds the flag already set is covered by a pass that has not started yet:
  a burst of 1,000 submits queues about one pass and no wake-up is lost.

Many ``request_pass`` calls in one transaction send one wake-up.
"""

from __future__ import annotations

import contextlib
import logging

from django.db import connection, transaction

from kernel.prepared import prepared_cursor

log = logging.getLogger(__name__)

WAKE_CHANNEL = "scheduler_wake"
WAKE_ROW = "wake"
Q_TASK_FUNC = "scheduling.passes.run_requested_pass"

# One statement: NOTIFY always; set the flag if it was clear, and report whether this
# request flipped it and whether the row is there. An UPDATE whose condition fails on the
# row it finds neither locks nor writes it, so while the flag is set (a burst of submits)
# a wake-up only notifies: the upsert this replaced locked the row every time, which made
# each wake-up a write, at twice the server's CPU (130 against 65 µs). Concurrent wake-ups
# that both find the flag clear still flip it once: the second one's UPDATE waits for the
# first's and then finds the flag set.
_WAKE_SQL = """
WITH flipped AS (
    UPDATE scheduling_schedulerlock SET pass_requested = true, requested_at = now()
    WHERE name = %s AND NOT pass_requested
    RETURNING 1
)
SELECT pg_notify(%s, %s), (SELECT count(*) FROM flipped),
       EXISTS (SELECT 1 FROM scheduling_schedulerlock WHERE name = %s)
"""

# The row comes with migration 0002; should it have been deleted, the wake-up makes it
# (flag set) and counts as the flip.
_CREATE_SQL = """
INSERT INTO scheduling_schedulerlock (name, holder, pass_requested, requested_at)
VALUES (%s, '', true, now())
ON CONFLICT (name) DO UPDATE SET pass_requested = true, requested_at = now()
WHERE NOT scheduling_schedulerlock.pass_requested
"""

_CLEAR_SQL = """
UPDATE scheduling_schedulerlock SET pass_requested = false
WHERE name = %s AND pass_requested
"""


class _PendingWake:
    """The one after-commit wake-up of a transaction; later requests add their reason."""

    def __init__(self, reason: str) -> None:
        self.reasons = [reason]
        self.sent = False
        # Django names a failed robust on_commit callback by its __qualname__ when it logs
        # the error; an instance has none of its own, and the logging itself would crash.
        self.__qualname__ = "scheduling.triggers.request_pass"

    def __call__(self) -> None:
        self.sent = True
        reason = self.reasons[0] if len(self.reasons) == 1 else f"{self.reasons[0]} (+{len(self.reasons) - 1} more)"
        wake(reason)


def wake(reason: str) -> bool:
    """Send the wake-up now (autocommit). True when this call enqueued a q pass."""
    with prepared_cursor() as cursor:  # after every submit
        cursor.execute(_WAKE_SQL, [WAKE_ROW, WAKE_CHANNEL, reason[:200], WAKE_ROW])
        (_, flipped, row_exists) = cursor.fetchone()
        if not row_exists:
            cursor.execute(_CREATE_SQL, [WAKE_ROW])
            flipped = cursor.rowcount
    if not flipped:
        return False
    from django_q.conf import Conf
    from django_q.tasks import async_task

    try:
        # In a transaction of its own: outside one, django-q's ORM broker first closes every
        # connection older than CONN_MAX_AGE, which at 0 (processes without a pool) is this
        # one, so each wake-up that enqueued reconnected (a new PostgreSQL backend, 5-10 ms of
        # the submitter's time and of the CPU the pass it asks for needs). Not under Q_SYNC:
        # there the pass runs inline and must not run inside a transaction of ours.
        with transaction.atomic() if not Conf.SYNC else contextlib.nullcontext():
            async_task(Q_TASK_FUNC, reason[:200], task_name="scheduler pass")
    except Exception:
        # The NOTIFY above still wakes runscheduler; leave the flag clear so the next
        # request retries the enqueue instead of trusting a pass that was never queued.
        log.exception("could not enqueue a scheduler pass (%s)", reason)
        clear_request()
        return False
    return True


def clear_request() -> bool:
    """Clear the flag; True if it was set. Called by every pass before it takes the lock."""
    with connection.cursor() as cursor:
        cursor.execute(_CLEAR_SQL, [WAKE_ROW])
        return cursor.rowcount == 1


def request_pass(reason: str) -> None:
    if connection.in_atomic_block:
        # Coalesce: one wake-up per transaction however many changes it made (joined only
        # at the same savepoint level, so a rolled-back savepoint takes its own along).
        level = set(connection.savepoint_ids)
        for sids, func, _robust in connection.run_on_commit:
            if isinstance(func, _PendingWake) and not func.sent and sids == level:
                func.reasons.append(reason)
                return
    # robust: the change is committed already; a failed wake-up is logged, and the
    # periodic passes and sweep still pick the change up.
    transaction.on_commit(_PendingWake(reason), robust=True)
