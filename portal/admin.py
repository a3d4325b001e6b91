from __future__ import annotations

from django.contrib import admin
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from portal.models import Alert, ControlPlaneServer


@admin.register(ControlPlaneServer)
class ControlPlaneServerAdmin(admin.ModelAdmin):
    list_display = ["name", "role", "hostname", "pid", "version", "started_at", "last_seen_at", "alive"]
    list_filter = ["role"]
    readonly_fields = ["name", "role", "hostname", "pid", "version", "started_at", "last_seen_at", "info"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(boolean=True, description=_("alive"))
    def alive(self, obj: ControlPlaneServer) -> bool:
        from portal import registry

        return registry.is_alive(obj)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["created_at", "severity", "kind", "message", "node", "gpu", "task", "acknowledged_at"]
    list_filter = ["kind", "severity", ("acknowledged_at", admin.EmptyFieldListFilter)]
    search_fields = ["message"]
    list_select_related = ["node", "gpu__node", "task"]
    readonly_fields = ["kind", "severity", "message", "node", "gpu", "task", "created_at", "acknowledged_at",
                       "acknowledged_by"]
    actions = ["acknowledge"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description=_("Acknowledge"))
    def acknowledge(self, request, queryset) -> None:
        n = queryset.filter(acknowledged_at__isnull=True).update(
            acknowledged_at=timezone.now(), acknowledged_by=request.user
        )
        self.message_user(request, _("%(n)s alert(s) acknowledged.") % {"n": n})
