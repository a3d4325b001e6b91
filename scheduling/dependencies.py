"""Task dependencies: a task waits until others end as it asked (Slurm's ``--dependency``).

- ``after_ok``: the other task succeeded; ``after_any``: it ended, however;
  ``after_not_ok``: it failed, was cancelled or timed out.
- Submitted as ``{"after_ok": [12, 13]}`` or in Slurm's words, ``"afterok:12:13,afterany:14"``
  (every condition must hold). A dependency names tasks that already exist and that the
  submitter can see, so no cycle can form; unknown ids are refused.
- Each pass holds back the pending tasks still waiting ("waiting for task #12 to succeed")
  before the placement core sees the queue. A dependency that can no longer be satisfied
  cancels its dependent with the reason, unless ``cancel_invalid_dependents`` is off (then
  it waits with that reason, like Slurm's ``kill_invalid_depend`` unset).
"""

from __future__ import annotations

import re
from typing import Any

from django.db import connection
from django.utils.translation import gettext as _

from scheduling.choices import FINAL_STATUSES, TaskStatus

AFTER_OK, AFTER_ANY, AFTER_NOT_OK = "after_ok", "after_any", "after_not_ok"
KINDS = (AFTER_OK, AFTER_ANY, AFTER_NOT_OK)
_SLURM = {"afterok": AFTER_OK, "afterany": AFTER_ANY, "afternotok": AFTER_NOT_OK}
MAX_DEPENDENCIES = 64
_NOT_OK = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT)
_ID = re.compile(r"^\d{1,18}$")


def parse(value: Any) -> tuple[list[tuple[str, int]], str | None]:
    """``[(kind, task id)]`` from the API's object or Slurm's string, or an error message."""
    if value in (None, "", {}):
        return [], None
    pairs: list[tuple[str, int]] = []
    if isinstance(value, str):
        for part in value.replace(" ", "").split(","):
            words = part.split(":")
            kind = _SLURM.get(words[0].lower(), words[0].lower() if words[0].lower() in KINDS else None)
            if kind is None or len(words) < 2 or not all(_ID.match(w) for w in words[1:]):
                return [], (_("Cannot read %(part)r: use afterok:ID[:ID...], afterany:ID or afternotok:ID, "
                              "comma-separated.") % {"part": part})
            pairs += [(kind, int(w)) for w in words[1:]]
    elif isinstance(value, dict):
        for kind, ids in value.items():
            if kind not in KINDS:
                return [], _("Unknown kind %(kind)r: use %(kinds)s.") % {"kind": kind, "kinds": ", ".join(KINDS)}
            ids = ids if isinstance(ids, list) else [ids]
            for raw in ids:
                if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and _ID.match(raw))):
                    return [], _("%(kind)s: task ids must be whole numbers.") % {"kind": kind}
                pairs.append((kind, int(raw)))
    else:
        return [], _('Must be an object like {"after_ok": [12, 13]} or a string like "afterok:12:13".')
    pairs = list(dict.fromkeys(pairs))
    if len(pairs) > MAX_DEPENDENCIES:
        return [], _("At most %(limit)s dependencies (got %(got)s).") % {"limit": MAX_DEPENDENCIES, "got": len(pairs)}
    return pairs, None


def unknown_ids(pairs: list[tuple[str, int]], visible_ids: set[int]) -> list[int]:
    return sorted({tid for _kind, tid in pairs} - visible_ids)


def state_of(kind: str, status: str) -> str:
    """``"ok"`` (satisfied), ``"wait"`` or ``"never"`` for one dependency whose task is in ``status``."""
    if status not in FINAL_STATUSES:
        return "wait"
    if kind == AFTER_ANY:
        return "ok"
    if kind == AFTER_OK:
        return "ok" if status == TaskStatus.SUCCEEDED else "never"
    return "ok" if status in _NOT_OK else "never"


_GOAL = {AFTER_OK: "succeed", AFTER_ANY: "end", AFTER_NOT_OK: "fail"}

# Only pending tasks with dependencies: nothing to read when nobody uses them.
PENDING_DEPENDENCIES_SQL = f"""
SELECT d.task_id, d.depends_on_id, d.kind, p.status
FROM scheduling_taskdependency d
JOIN scheduling_task t ON t.id = d.task_id AND t.status = '{TaskStatus.PENDING}'
JOIN scheduling_task p ON p.id = d.depends_on_id
ORDER BY d.task_id, d.depends_on_id
"""  # noqa: S608


def blocked() -> tuple[dict[int, str], dict[int, str]]:
    """Pending tasks held by their dependencies: ``(waiting, unsatisfiable)``, task id -> reason."""
    with connection.cursor() as cursor:
        cursor.execute(PENDING_DEPENDENCIES_SQL)
        return blocked_from_rows(cursor.fetchall())


def blocked_from_rows(rows: list[tuple]) -> tuple[dict[int, str], dict[int, str]]:
    """``blocked`` from the rows of ``PENDING_DEPENDENCIES_SQL`` (the pass reads them in its batch)."""
    waiting: dict[int, str] = {}
    never: dict[int, str] = {}
    for task_id, other, kind, status in rows:
        state = state_of(kind, status)
        if state == "never" and task_id not in never:
            never[task_id] = (f"dependency can never be satisfied: task #{other} ended {status.replace('_', ' ')}, "
                              f"it was to {_GOAL[kind]}")
        elif state == "wait" and task_id not in waiting:
            waiting[task_id] = f"waiting for task #{other} to {_GOAL[kind]}"
    for task_id in never:
        waiting.pop(task_id, None)
    return waiting, never
