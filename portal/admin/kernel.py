from __future__ import annotations

import csv

import pghistory.admin
from django.contrib import admin
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.http import HttpResponse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from kernel import registry
from kernel.models import Alert, ControlPlaneServer


@admin.register(ControlPlaneServer)
class ControlPlaneServerAdmin(admin.ModelAdmin):
    list_display = ["name", "role", "hostname", "pid", "version", "started_at", "last_seen_at", "alive"]
    list_filter = ["role"]
    readonly_fields = ["name", "role", "hostname", "pid", "version", "started_at", "last_seen_at", "info"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(boolean=True, description=_("alive"))
    def alive(self, obj: ControlPlaneServer) -> bool:

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


# --- the audit log (django-pghistory events; context from portal.audit) -----------------


def describe_changes(event) -> str:
    """'max_gpus: 8 → 16; role: member → admin' (or the row's values for inserts/deletes)."""
    diff = event.pgh_diff or {}
    if diff:
        return "; ".join(f"{field}: {old!r} → {new!r}" for field, (old, new) in sorted(diff.items()))
    data = {k: v for k, v in (event.pgh_data or {}).items() if k != "id"}
    return "; ".join(f"{k}={v!r}" for k, v in sorted(data.items()))


def describe_actor(event) -> tuple[str, str]:
    context = event.pgh_context or {}
    who = context.get("username") or context.get("os_user") or (f"user #{context['user']}" if context.get("user")
                                                                 else "")
    return context.get("source") or "system", who


class AuditEventsAdmin(pghistory.admin.EventsAdmin):
    """Every audited change as one searchable log (search matches the object, the event,
    the values and the context: a username, a source, a tenant slug), exportable as CSV.
    Each audited object's change page links here filtered to it ("Events")."""

    list_display = ["pgh_created_at", "pgh_obj_model", "pgh_obj_id", "pgh_label", "changes", "source", "actor"]
    search_fields = ["pgh_obj_id"]  # widened in get_search_results
    actions = ["export_csv"]

    def get_list_display(self, request):
        return self.list_display

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        queryset = queryset.annotate(_data=Cast("pgh_data", TextField()), _context=Cast("pgh_context", TextField()))
        return queryset.filter(Q(pgh_obj_model__icontains=term) | Q(pgh_obj_id=term) | Q(pgh_label__icontains=term)
                               | Q(_data__icontains=term) | Q(_context__icontains=term)), False

    @admin.display(description=_("old → new"))
    def changes(self, event) -> str:
        return describe_changes(event)

    @admin.display(description=_("source"))
    def source(self, event) -> str:
        return describe_actor(event)[0]

    @admin.display(description=_("actor"))
    def actor(self, event) -> str:
        return describe_actor(event)[1]

    @admin.action(description=_("Export selected events as CSV"))
    def export_csv(self, request, queryset) -> HttpResponse:
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="audit.csv"'
        writer = csv.writer(response)
        writer.writerow(["time", "model", "object", "event", "source", "actor", "url", "changes"])
        for event in queryset.order_by("pgh_created_at"):
            source, who = describe_actor(event)
            writer.writerow([event.pgh_created_at.isoformat(), event.pgh_obj_model, event.pgh_obj_id,
                             event.pgh_label, source, who, (event.pgh_context or {}).get("url", ""),
                             describe_changes(event)])
        return response
