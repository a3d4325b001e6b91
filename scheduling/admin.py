from __future__ import annotations

from django.contrib import admin

from scheduling.models import Allocation, ModelMemoryEstimate, Task, TaskEvent, TaskLogChunk


class ReadOnlyMixin:
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class TaskEventInline(ReadOnlyMixin, admin.TabularInline):
    model = TaskEvent
    extra = 0
    fields = ["created_at", "from_status", "to_status", "actor", "reason"]
    readonly_fields = fields


class AllocationInline(ReadOnlyMixin, admin.TabularInline):
    model = Allocation
    extra = 0
    fields = ["gpu", "node", "memory_mb", "exclusive", "allocated_at", "released_at"]
    readonly_fields = fields


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "tenant", "status", "priority", "workload_class", "gpu_count", "gpu_memory_mb",
                    "node", "queue_position", "pending_reason", "created_at"]
    list_filter = ["status", "tenant", "priority", "workload_class", "node", "share_mode"]
    search_fields = ["name", "command", "model_name", "tenant__slug", "submitter__username"]
    list_select_related = ["tenant", "node"]
    date_hierarchy = "created_at"
    readonly_fields = ["status", "pending_reason", "queue_position", "node", "exit_code", "failure_reason", "oom",
                       "attempt", "created_at", "assigned_at", "started_at", "finished_at", "updated_at", "log_tail"]
    fieldsets = [
        (None, {"fields": ["tenant", "submitter", "name", "command", "env", "working_dir"]}),
        ("Resources", {"fields": ["gpu_count", "gpu_memory_mb", "share_mode", "model_name", "priority",
                                  "workload_class", "timeout_s", "node_selector", "gpu_model", "max_retries"]}),
        ("State", {"fields": ["status", "pending_reason", "queue_position", "node", "exit_code", "failure_reason",
                              "oom", "attempt", "created_at", "assigned_at", "started_at", "finished_at",
                              "updated_at"]}),
        ("Log", {"fields": ["log_tail"]}),
    ]
    inlines = [AllocationInline, TaskEventInline]
    autocomplete_fields = ["tenant", "submitter"]

    @admin.display(description="log (last 200 lines)")
    def log_tail(self, obj: Task):
        from django.utils.html import format_html

        if obj.pk is None:
            return "—"
        chunks = obj.log_chunks.filter(attempt=obj.attempt).order_by("-offset").values_list("data", flat=True)
        chunks = list(chunks[:50])
        text = "".join(reversed(chunks))
        lines = text.splitlines()[-200:]
        return format_html('<pre style="max-height:30em;overflow:auto">{}</pre>', "\n".join(lines) or "(no output)")


@admin.register(TaskEvent)
class TaskEventAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["created_at", "task", "from_status", "to_status", "actor", "reason"]
    list_filter = ["to_status", "actor"]
    search_fields = ["task__name", "reason", "actor"]
    list_select_related = ["task"]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff


@admin.register(Allocation)
class AllocationAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["task", "gpu", "node", "memory_mb", "exclusive", "allocated_at", "released_at"]
    list_filter = ["exclusive", "node"]
    list_select_related = ["task", "gpu__node", "node"]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff


@admin.register(ModelMemoryEstimate)
class ModelMemoryEstimateAdmin(admin.ModelAdmin):
    list_display = ["model_name", "memory_mb", "oom_count", "updated_at"]
    search_fields = ["model_name"]


@admin.register(TaskLogChunk)
class TaskLogChunkAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["task", "attempt", "offset", "created_at"]
    list_select_related = ["task"]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff
