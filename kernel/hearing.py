"""When the control plane could hear agents: evidence for judging a server lost.

A server is declared lost only after the portal has been *able* to hear from it for
a full heartbeat timeout. The portal's own silence (it was stopped for an upgrade,
the database restarted, every web node was down) is not evidence against a server,
so the clock of every server restarts with the portal's listening:

- ``heard()`` is called after each ingested agent heartbeat and by each web process's
  registry beat (at most once a second per process, one upsert on a single row);
- when the previous touch is older than ``gap_s()`` (two heartbeat intervals: a gap
  no working portal leaves), ``listening_since`` restarts at now;
- the sweep (``scheduling.sweep``) only judges servers while the portal is listening
  now and has been for a full timeout.

All times are the database's clock.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.db import connection

# Per process: touch the row at most this often (heartbeats arrive by the thousand).
TOUCH_EVERY_S = 1.0

_touch_lock = threading.Lock()
_last_touch = 0.0

_HEARD_SQL = """
INSERT INTO portal_hearing (id, listening_since, last_heard_at) VALUES (1, statement_timestamp(), statement_timestamp())
ON CONFLICT (id) DO UPDATE SET
    listening_since = CASE WHEN portal_hearing.last_heard_at < statement_timestamp() - make_interval(secs => %s)
                           THEN statement_timestamp() ELSE portal_hearing.listening_since END,
    last_heard_at = GREATEST(portal_hearing.last_heard_at, statement_timestamp())
"""

# SQL fragment (for the sweep): true when the portal hears now and has listened for %s seconds.
LISTENED_FOR_SQL = """EXISTS (
    SELECT 1 FROM portal_hearing h
    WHERE h.last_heard_at >= now() - make_interval(secs => %s)
      AND h.listening_since <= now() - make_interval(secs => %s))"""


def gap_s() -> float:
    """A silence this long means the portal itself could not hear (no working portal leaves one)."""
    return 2.0 * settings.SCHEDULER.heartbeat_interval_s


def heard(*, force: bool = False) -> bool:
    """Record that the portal hears now; True when this call wrote the row."""
    global _last_touch
    now = time.monotonic()
    with _touch_lock:
        if not force and now - _last_touch < TOUCH_EVERY_S:
            return False
        _last_touch = now
    try:
        with connection.cursor() as cursor:
            cursor.execute(_HEARD_SQL, [gap_s()])
    except Exception:
        with _touch_lock:
            _last_touch = 0.0  # retry at the next call rather than a second later
        raise
    return True


def listened_for_params(seconds: float) -> list[float]:
    """Parameters of ``LISTENED_FOR_SQL`` for a judgement that needs ``seconds`` of listening."""
    return [gap_s(), seconds]
