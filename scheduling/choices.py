"""Named constants for tasks, shared by models, the placement core, API and admin.

A task's priority and workload class are ``tenants.choices`` (quotas are written in them).
"""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class TaskStatus(models.TextChoices):
    # Labels are what people read (translated); API values are the first items.
    PENDING = "pending", _("pending")
    ASSIGNED = "assigned", _("assigned")
    RUNNING = "running", _("running")
    SUCCEEDED = "succeeded", _("succeeded")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")
    TIMED_OUT = "timed_out", _("timed out")


# "active": holds GPUs on a server (assigned or running). "open": not final yet, queued or
# active. Every filter, page and SQL statement uses these two words in these two senses.
ACTIVE_STATUSES = (TaskStatus.ASSIGNED, TaskStatus.RUNNING)
OPEN_STATUSES = (TaskStatus.PENDING, *ACTIVE_STATUSES)
FINAL_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT)
# The groups a listing's status filter offers beside single statuses (``?status=open``).
STATUS_GROUPS: dict[str, tuple[str, ...]] = {"open": OPEN_STATUSES, "active": ACTIVE_STATUSES}

# Which transitions the state machine allows (anything else is a bug).
TRANSITIONS: dict[str, frozenset[str]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.ASSIGNED, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.ASSIGNED: frozenset(
        {TaskStatus.RUNNING, TaskStatus.PENDING, TaskStatus.CANCELLED, TaskStatus.FAILED,
         TaskStatus.SUCCEEDED, TaskStatus.TIMED_OUT}
    ),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT, TaskStatus.PENDING}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    TaskStatus.TIMED_OUT: frozenset(),
}


class ShareMode(models.TextChoices):
    EXCLUSIVE = "exclusive", "exclusive (whole GPUs)"
    SHARED = "shared", "shared (packs by memory)"
