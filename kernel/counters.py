"""Durable counters (``MetricCounter`` rows) that every process adds to and ``/metrics``
reads (``portal.metrics``): a scheduler pass on any node is counted in the same rows."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connection

PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Placements and their waits in the queue (placement time - submit time, seconds), added to by
# the statement that places the tasks (``scheduling.lifecycle``), in its transaction: exact,
# and a scrape reads these rows instead of every task and event ever.
PLACEMENTS = "scheduler_placements"
QUEUE_WAIT_SUM = "scheduler_queue_wait_seconds_sum"
QUEUE_WAIT_BUCKET = "scheduler_queue_wait_seconds_bucket"
QUEUE_WAIT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


def bucket_label(bound: float) -> str:
    """A histogram bucket's ``labels`` in ``MetricCounter``: ``le="5.0"``."""
    return f'le="{float(bound)}"'


def record_pass(duration_s: float, *, ok: bool = True) -> None:
    """Count one scheduler pass (call it after the pass, committed or not).

    One statement, adding to shared rows, so passes on any node are summed.
    Its placements are not counted here: the statement that makes them counts them (PLACEMENTS).
    """
    rows: list[tuple[str, str, float]] = [
        ("scheduler_passes", "", 1.0),
        ("scheduler_pass_duration_seconds_sum", "", float(duration_s)),
    ]
    rows += [("scheduler_pass_duration_seconds_bucket", bucket_label(b), 1.0) for b in PASS_BUCKETS if duration_s <= b]
    if not ok:
        rows.append(("scheduler_schedule_failures", "", 1.0))
    _add(rows)


def _add(rows: Iterable[tuple[str, str, float]]) -> None:
    rows = list(rows)
    values = ", ".join(["(%s, %s, %s, now())"] * len(rows))
    params = [p for row in rows for p in row]
    with connection.cursor() as cur:
        cur.execute(
            f"INSERT INTO portal_metriccounter (name, labels, value, updated_at) VALUES {values} "  # noqa: S608
            "ON CONFLICT (name, labels) DO UPDATE SET value = portal_metriccounter.value + EXCLUDED.value, "
            "updated_at = EXCLUDED.updated_at",
            params,
        )
