from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.db.models import Count, Q
from django.utils.html import format_html

from nodes.enrolment import issue_join_token
from nodes.models import GPU, JoinToken, Node


class GPUInline(admin.TabularInline):
    model = GPU
    extra = 0
    fields = ["index", "uuid", "model_name", "memory_used_mb", "memory_total_mb", "utilization_pct",
              "temperature_c", "power_w", "health", "cordoned", "cordon_reason", "reserved"]
    readonly_fields = ["memory_used_mb", "utilization_pct", "temperature_c", "power_w", "health"]
    show_change_link = True


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "status", "heartbeat", "gpu_count", "gpus_busy", "agent_version", "labels"]
    list_filter = ["status"]
    search_fields = ["name", "hostname"]
    readonly_fields = ["last_heartbeat_at", "agent_version", "token_prefix", "created_at", "updated_at"]
    fields = ["name", "hostname", "labels", "status", "status_reason", "last_heartbeat_at", "agent_version",
              "token_prefix", "created_at", "updated_at"]
    inlines = [GPUInline]
    actions = ["drain", "resume", "maintenance", "make_join_token"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            gpu_n=Count("gpus", distinct=True),
            busy_n=Count("allocations__gpu", filter=Q(allocations__released_at__isnull=True), distinct=True),
        )

    @admin.display(description="GPUs", ordering="gpu_n")
    def gpu_count(self, obj: Node) -> int:
        return obj.gpu_n

    @admin.display(description="GPUs busy", ordering="busy_n")
    def gpus_busy(self, obj: Node) -> int:
        return obj.busy_n

    @admin.display(description="last heartbeat", ordering="last_heartbeat_at")
    def heartbeat(self, obj: Node):
        if obj.last_heartbeat_at is None:
            return "never"
        age = int(obj.heartbeat_age().total_seconds())
        colour = "#c00" if obj.heartbeat_overdue else "inherit"
        return format_html('<span style="color:{}">{} s ago</span>', colour, age)

    def _set_status(self, request, queryset, status: str, verb: str) -> None:
        n = queryset.update(status=status, status_reason=f"{verb} by {request.user.username}")
        self.message_user(request, f"{n} server(s) {verb}.", messages.SUCCESS)

    @admin.action(description="Drain: finish running tasks, take no new ones")
    def drain(self, request, queryset) -> None:
        self._set_status(request, queryset, "draining", "drained")

    @admin.action(description="Resume: accept tasks again")
    def resume(self, request, queryset) -> None:
        self._set_status(request, queryset, "active", "resumed")

    @admin.action(description="Make a one-time join token for the agent (shown once)")
    def make_join_token(self, request, queryset) -> None:
        for node in queryset.order_by("name"):
            secret = issue_join_token(node, note=f"made by {request.user.username}", ttl=timedelta(days=1))
            self.message_user(
                request,
                f"Join token for {node.name} (valid 24 h, once; shown only now): {secret}  -  on the server run: "
                f"python -m nodes.agent --portal <URL> --name {node.name} --join-token {secret}",
                messages.WARNING,
            )

    @admin.action(description="Maintenance: take out of service")
    def maintenance(self, request, queryset) -> None:
        self._set_status(request, queryset, "maintenance", "put in maintenance")


@admin.register(GPU)
class GPUAdmin(admin.ModelAdmin):
    list_display = ["__str__", "model_name", "memory", "utilization_pct", "temperature_c", "power_w", "health",
                    "cordoned", "cordon_reason", "reserved"]
    list_filter = ["health", "cordoned", "reserved", "model_name", "node"]
    search_fields = ["uuid", "node__name", "model_name"]
    list_select_related = ["node"]
    readonly_fields = ["node", "index", "uuid", "model_name", "memory_total_mb", "memory_used_mb",
                       "utilization_pct", "temperature_c", "power_w", "health", "ecc_errors", "retired_pages",
                       "loaded_models", "idle_since", "updated_at"]
    actions = ["cordon", "uncordon"]

    @admin.display(description="memory used / total (MB)")
    def memory(self, obj: GPU) -> str:
        return f"{obj.memory_used_mb} / {obj.memory_total_mb}"

    @admin.action(description="Cordon: take no new tasks")
    def cordon(self, request, queryset) -> None:
        n = queryset.update(cordoned=True, cordon_reason=f"cordoned by {request.user.username}")
        self.message_user(request, f"{n} GPU(s) cordoned.", messages.SUCCESS)

    @admin.action(description="Uncordon: accept tasks again")
    def uncordon(self, request, queryset) -> None:
        n = queryset.update(cordoned=False, cordon_reason="")
        self.message_user(request, f"{n} GPU(s) uncordoned.", messages.SUCCESS)


@admin.register(JoinToken)
class JoinTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "node", "note", "expires_at", "used_at", "revoked", "created_at"]
    list_filter = ["revoked"]
    readonly_fields = ["prefix", "used_at", "created_at"]
    fields = ["node", "note", "expires_at", "revoked", "prefix", "used_at", "created_at"]

    def has_add_permission(self, request) -> bool:
        # Made by the "join token" action on a server (or the cluster), which shows the secret once.
        return False
