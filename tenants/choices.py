"""The classes quotas are written in, and tasks carry: priority and workload class."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class Priority(models.IntegerChoices):
    # Higher value = scheduled first. Stored as integers so the queue index sorts them.
    LOW = 0, "LOW"
    NORMAL = 1, "NORMAL"
    HIGH = 2, "HIGH"
    CRITICAL = 3, "CRITICAL"

    @classmethod
    def from_name(cls, name: str) -> Priority:
        return cls[name.strip().upper()]


class WorkloadClass(models.TextChoices):
    ONLINE = "online", _("online (inference)")
    BATCH = "batch", _("batch")
