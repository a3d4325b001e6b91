"""Task arrays: one submission, many tasks sharing an array id (Slurm's ``--array``).

``"0-99%8"`` makes tasks with indexes 0..99, at most 8 of them running at once. The syntax
is Slurm's: comma-separated indexes and ranges, a range may have a step (``0-15:4``), and
``%N`` at the end throttles. Each element is an ordinary task (cancel, show, logs work on
it) whose environment carries ``TASK_ARRAY_INDEX`` and ``SLURM_ARRAY_TASK_ID`` (and the
array's id as ``TASK_ARRAY_ID``/``SLURM_ARRAY_JOB_ID``). The throttle is kept by the pass:
elements beyond it are held back before the placement core sees the queue.
"""

from __future__ import annotations

import re

from django.db import connection
from django.utils.translation import gettext

from scheduling.choices import TaskStatus

MAX_INDEX = 1_000_000
_PART = re.compile(r"^(\d{1,7})(?:-(\d{1,7})(?::(\d{1,7}))?)?$")


def parse(value: object, max_elements: int) -> tuple[list[int], int, str | None]:
    """``(indexes, throttle, error)`` for an array spec; throttle 0 means no limit."""
    if not isinstance(value, str) or not value.strip():
        return [], 0, gettext('Must be a string like "0-99%8" (indexes, ranges with an optional :step, %throttle).')
    text = value.replace(" ", "")
    throttle = 0
    if "%" in text:
        text, _, limit = text.partition("%")
        if not limit.isdigit() or int(limit) < 1:
            return [], 0, (gettext("The throttle after %% must be a whole number of at least 1 (got %(got)r).")
                           % {"got": limit})
        throttle = int(limit)
    indexes: list[int] = []
    for part in text.split(","):
        m = _PART.match(part)
        if m is None:
            return [], 0, (gettext("Cannot read %(part)r: use N, N-M or N-M:STEP, comma-separated, then %%LIMIT.")
                           % {"part": part})
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo or step < 1 or hi > MAX_INDEX:
            return [], 0, (gettext("Bad range %(part)r: from low to high (at most %(max)s), step at least 1.")
                           % {"part": part, "max": MAX_INDEX})
        if (hi - lo) // step + 1 + len(indexes) > max_elements:
            return [], 0, gettext("At most %(n)s elements in one array.") % {"n": max_elements}
        indexes.extend(range(lo, hi + 1, step))
    indexes = sorted(set(indexes))
    return indexes, throttle, None


def environment(array_id: int, index: int) -> dict[str, str]:
    return {"TASK_ARRAY_ID": str(array_id), "TASK_ARRAY_INDEX": str(index),
            "SLURM_ARRAY_JOB_ID": str(array_id), "SLURM_ARRAY_TASK_ID": str(index)}


# Live elements of throttled arrays, pending ones in queue order.
THROTTLED_SQL = f"""
SELECT t.array_id, a.throttle, t.id, t.status
FROM scheduling_taskarray a
JOIN scheduling_task t ON t.array_id = a.id
WHERE a.throttle > 0 AND t.status IN ('{TaskStatus.PENDING}', '{TaskStatus.ASSIGNED}', '{TaskStatus.RUNNING}')
ORDER BY t.array_id, t.priority DESC, t.created_at, t.id
"""  # noqa: S608


def throttled() -> dict[int, str]:
    """Pending elements that would exceed their array's throttle: task id -> reason."""
    with connection.cursor() as cursor:
        cursor.execute(THROTTLED_SQL)
        return throttled_from_rows(cursor.fetchall())


def throttled_from_rows(rows: list[tuple]) -> dict[int, str]:
    """``throttled`` from the rows of ``THROTTLED_SQL`` (the pass reads them in its batch)."""
    active: dict[int, int] = {}
    for array_id, _throttle, _task, status in rows:
        if status != TaskStatus.PENDING:
            active[array_id] = active.get(array_id, 0) + 1
    held: dict[int, str] = {}
    let_through: dict[int, int] = {}
    for array_id, throttle, task_id, status in rows:
        if status != TaskStatus.PENDING:
            continue
        room = throttle - active.get(array_id, 0)
        if let_through.get(array_id, 0) < room:
            let_through[array_id] = let_through.get(array_id, 0) + 1
        else:
            held[task_id] = f"array #{array_id} runs at most {throttle} elements at once (%{throttle})"
    return held
