from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.translation import gettext_lazy as _

from kernel import events
from scheduling import triggers


class SchedulingConfig(AppConfig):
    name = "scheduling"
    verbose_name = _("Scheduling")

    def ready(self) -> None:
        from scheduling.sweep import register_schedule  # it imports models: only once the registry is ready

        events.capacity_changed.connect(_capacity_changed, dispatch_uid="scheduling.capacity_changed")

        # The every-minute sweep as a django-q2 Schedule, registered idempotently.
        post_migrate.connect(register_schedule, sender=self, dispatch_uid="scheduling.register_sweep_schedule")


def _capacity_changed(sender, reason: str, **kwargs) -> None:
    triggers.request_pass(reason)
