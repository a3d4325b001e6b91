from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.admin.views.main import PAGE_VAR
from django.db.models import Q
from django.utils.html import format_html
from django.utils.timesince import timesince
from django.utils.translation import gettext_lazy as _

from portal.livedata import tenant_hue
from portal.pagination import COUNT_CAP, BoundedCountPaginator
from scheduling import lifecycle, reservations
from scheduling.choices import OPEN_STATUSES, TaskStatus
from scheduling.models import (
    Allocation,
    ModelMemoryEstimate,
    Reservation,
    ReservationPolicy,
    ReservationSlot,
    Task,
    TaskEvent,
    TaskLogChunk,
    TaskRank,
)
from scheduling.reasons import translate_reason
from tenants.choices import Priority


class TaskActionForm(ActionForm):
    """The action bar of the task list, with the new priority for "Change priority"."""

    priority = forms.TypedChoiceField(choices=[("", "priority…"), *Priority.choices], coerce=int, required=False,
                                      empty_value=None)


class ReadOnlyMixin:
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class BoundedCountMixin:
    """For the lists of tables that only grow (every event, every allocation interval): count
    no further than the page asked for needs, or ``list_count_cap`` rows (``BoundedCountPaginator``;
    templates/admin/pagination.html and search_form.html then say "more than N"). The changelist
    counted every row twice per page, once for the filtered list and once for the whole table:
    0.33 s a page over a year's 10 million intervals. Not for a list with actions: Django's
    "select all N" reads the count."""

    list_count_cap = COUNT_CAP
    show_full_result_count = False  # the second count, of the whole table

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        paginator = BoundedCountPaginator(queryset, per_page, cap=self.list_count_cap, orphans=orphans,
                                          allow_empty_first_page=allow_empty_first_page)
        # The changelist reads the count before it asks for its page: count as deep as that page.
        paginator.count_to_page(request.GET.get(PAGE_VAR, 1))
        return paginator


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


class TaskRankInline(ReadOnlyMixin, admin.TabularInline):
    model = TaskRank
    extra = 0
    fields = ["attempt", "rank", "node", "address", "port", "ready_at", "started_at", "finished_at", "exit_code"]
    readonly_fields = fields


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    # What an operator scans, one line per task at 1,366 px: long values are cut with an
    # ellipsis and shown whole on hover (title); the live cells keep their data-* hooks.
    # Priority is a filter and the queue position says where it stands (no room for both at 1,366 px).
    list_display = ["id", "short_name", "tenant_chip", "live_status", "gpus", "live_node", "live_queue_position",
                    "live_pending_reason", "age"]
    list_display_links = ["id", "short_name"]
    actions = ["cancel_tasks", "requeue_tasks", "change_priority"]
    action_form = TaskActionForm
    list_filter = ["status", "tenant", "priority", "workload_class", "node", "share_mode"]
    search_fields = ["name", "command", "model_name", "tenant__slug", "submitter__username"]
    list_select_related = ["tenant", "node"]
    date_hierarchy = "created_at"  # its links: templates/admin/scheduling/task/change_list.html
    # The filtered list is counted exactly ("select all N tasks" acts on that many); the whole
    # table's second count per page is skipped (46 ms over 2.5 million tasks).
    show_full_result_count = False
    readonly_fields = ["status", "pending_reason", "queue_position", "node", "exit_code", "failure_reason", "oom",
                       "attempt", "created_at", "assigned_at", "started_at", "finished_at", "updated_at", "log_tail"]
    fieldsets = [
        (None, {"fields": ["tenant", "submitter", "name", "command", "env", "working_dir"]}),
        ("Resources", {"fields": ["gpu_count", "gpu_memory_mb", "share_mode", "model_name", "priority",
                                  "workload_class", "timeout_s", "node_selector", "gpu_model", "max_retries",
                                  "nodes", "topology_key"]}),
        ("State", {"fields": ["status", "pending_reason", "queue_position", "node", "exit_code", "failure_reason",
                              "oom", "attempt", "created_at", "assigned_at", "started_at", "finished_at",
                              "updated_at"]}),
        ("Log", {"fields": ["log_tail"]}),
    ]
    inlines = [AllocationInline, TaskRankInline, TaskEventInline]
    autocomplete_fields = ["tenant", "submitter"]

    @admin.display(description=_("name"), ordering="name")
    def short_name(self, obj: Task):
        return format_html('<span class="trunc" title="{}">{}</span>', obj.name, obj.name)

    @admin.display(description=_("tenant"), ordering="tenant__slug")
    def tenant_chip(self, obj: Task):
        # The tenant's colour on the cluster grid, as a dot beside its name.
        return format_html('<span class="tenant-chip"><i style="background:hsl({},65%,55%)"></i>{}</span>',
                           tenant_hue(obj.tenant_id), obj.tenant.slug)

    @admin.display(description=_("GPUs"), ordering="gpu_count")
    def gpus(self, obj: Task):
        per_gpu = f"{obj.gpu_memory_mb / 1024:.0f} GB" if obj.gpu_memory_mb else _("whole")
        return f"{obj.gpu_count} \u00d7 {per_gpu}"  # a multiplication sign

    @admin.display(description=_("age"), ordering="-created_at")
    def age(self, obj: Task):
        return format_html('<span title="{}">{}</span>', obj.created_at.isoformat(timespec="seconds"),
                           timesince(obj.created_at, depth=1))

    @admin.display(description=_("status"), ordering="status")
    def live_status(self, obj: Task):
        return format_html('<span data-task="{}" data-field="status" class="task-status status-{}">{}</span>',
                           obj.pk, obj.status, obj.get_status_display())

    @admin.display(description=_("priority"), ordering="priority")
    def live_priority(self, obj: Task):
        return format_html('<span data-task="{}" data-field="priority_label">{}</span>', obj.pk,
                           Priority(obj.priority).label)

    @admin.display(description=_("server"), ordering="node__name")
    def live_node(self, obj: Task):
        name = obj.node.name if obj.node else ""
        return format_html('<span class="trunc" data-task="{}" data-field="node" title="{}">{}</span>', obj.pk, name,
                           name)

    @admin.display(description=_("pos."), ordering="queue_position")
    def live_queue_position(self, obj: Task):
        return format_html('<span data-task="{}" data-field="queue_position">{}</span>', obj.pk,
                           "" if obj.queue_position is None else obj.queue_position)

    @admin.display(description=_("pending reason"))
    def live_pending_reason(self, obj: Task):
        reason = translate_reason(obj.pending_reason)
        return format_html('<span class="trunc trunc-wide" data-task="{}" data-field="pending_reason" title="{}">'
                           '{}</span>', obj.pk, reason, reason)

    # --- operator actions: each one a TaskEvent with the operator as actor ----------------
    @admin.action(description=_("Cancel (kills a running process)"))
    def cancel_tasks(self, request, queryset) -> None:
        actor = f"admin:{request.user.username}"
        done = 0
        for pk in queryset.filter(status__in=OPEN_STATUSES).order_by("pk") \
                .values_list("pk", flat=True):
            task = lifecycle.cancel(pk, actor=actor, reason=f"cancelled by operator {request.user.username}")
            done += task.status == TaskStatus.CANCELLED
        self.message_user(request, _("%(n)s task(s) cancelled.") % {"n": done}, messages.SUCCESS)

    @admin.action(description=_("Requeue (back to pending; counts as a retry)"))
    def requeue_tasks(self, request, queryset) -> None:
        actor = f"admin:{request.user.username}"
        requeued, skipped = 0, 0
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            # An operator's requeue always returns the task to the queue, even with retries spent.
            task = lifecycle.operator_requeue(pk, actor=actor, reason=f"requeued by operator {request.user.username}")
            if task is None:  # pending is already queued; final tasks are history
                skipped += 1
            else:
                requeued += 1
        level = messages.SUCCESS if requeued else messages.WARNING
        note = _(" (%(n)s not assigned or running, left as they were)") % {"n": skipped} if skipped else ""
        self.message_user(request, _("%(n)s task(s) requeued%(note)s.") % {"n": requeued, "note": note}, level)

    @admin.action(description=_("Change priority to the one chosen beside the action"))
    def change_priority(self, request, queryset) -> None:
        try:
            new = Priority(int(request.POST.get("priority", "")))
        except ValueError:
            self.message_user(request, _("Choose a priority in the list beside the action first."), messages.ERROR)
            return
        actor = f"admin:{request.user.username}"
        changed = 0
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            changed += lifecycle.reprioritise(pk, new, actor=actor) is not None
        self.message_user(request, _("%(n)s task(s) now %(priority)s.") % {"n": changed, "priority": new.label},
                          messages.SUCCESS)

    @admin.display(description=_("log (last 200 lines)"))
    def log_tail(self, obj: Task):
        from django.utils.html import format_html

        if obj.pk is None:
            return "—"
        chunks = obj.log_chunks.filter(attempt=obj.attempt).order_by("-offset").values_list("data", flat=True)
        chunks = list(chunks[:50])
        text = "".join(reversed(chunks))
        lines = text.splitlines()[-200:]
        return format_html('<pre style="max-height:30em;overflow:auto">{}</pre>', "\n".join(lines) or "(no output)")


class ActorKindFilter(admin.SimpleListFilter):
    """Who made the change, by kind (the part of the actor before its colon). A filter on the
    actor itself listed every distinct actor, read from all events on every page view (0.8 s
    over 7.5 million events); a name is found with the search box."""

    title = _("actor")
    parameter_name = "actor_kind"

    def lookups(self, request, model_admin):
        return [("scheduler", _("the scheduler")), ("sweep", _("the sweep")), ("user", _("users")),
                ("admin", _("operators")), ("agent", _("agents"))]

    def queryset(self, request, queryset):
        kind = self.value()
        if kind not in dict(self.lookup_choices):
            return queryset
        return queryset.filter(Q(actor=kind) | Q(actor__startswith=f"{kind}:"))


@admin.register(TaskEvent)
class TaskEventAdmin(BoundedCountMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["created_at", "task", "from_status", "to_status", "actor", "reason"]
    list_filter = ["to_status", ActorKindFilter]
    search_fields = ["task__name", "reason", "actor"]
    list_select_related = ["task"]
    # Newest first, along the key's index: the model's (created_at, id) order sorted every event
    # ever for each page (7.6 s over 7.5 million). Ids follow the events' creation.
    ordering = ["-id"]

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff


@admin.register(Allocation)
class AllocationAdmin(BoundedCountMixin, ReadOnlyMixin, admin.ModelAdmin):
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


class ReservationSlotInline(ReadOnlyMixin, admin.TabularInline):
    model = ReservationSlot
    fields = ["gpu", "period"]
    readonly_fields = ["gpu", "period"]
    extra = 0


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    """Staff approve (book GPUs) or reject reservation requests. Requests are made by tenant
    admins on the portal's Reservations page (or the API); approval goes through
    scheduling.reservations so a conflict is refused with its reason."""

    list_display = ["name", "tenant", "gpu_count", "gpu_model", "starts_at", "ends_at", "repeat_weeks", "state",
                    "window", "requested_by", "decided_by"]
    list_filter = ["state", "tenant"]
    search_fields = ["name", "tenant__slug", "reason"]
    readonly_fields = ["state", "requested_by", "decided_by", "decided_at", "decision_note", "released_at",
                       "next_bound_at", "created_at"]
    autocomplete_fields = ["tenant"]
    inlines = [ReservationSlotInline]
    actions = ["approve", "reject", "simulate"]
    change_list_template = "admin/scheduling/reservation/change_list.html"

    def has_add_permission(self, request) -> bool:
        # Requests come through the portal or the API, which check conflicts and policy.
        return False

    def get_readonly_fields(self, request, obj=None):
        # Once decided, its booked slots follow the window as approved: editing it here
        # would leave them behind. Reject and request again instead.
        if obj is not None and obj.state != Reservation.State.REQUESTED:
            return [f.name for f in Reservation._meta.fields if f.name != "id"] + ["nodes"]
        return self.readonly_fields

    @admin.display(description=_("now"))
    def window(self, obj: Reservation) -> str:
        return reservations.as_row(obj)["status"]

    def _decide(self, request, queryset, approve: bool) -> None:
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                res = reservations.decide(pk, approve=approve, by=request.user)
            except reservations.ReservationError as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, _("Reservation %(name)s %(state)s.") % {"name": res.name,
                                                                                   "state": res.get_state_display()})

    @admin.action(description=_("Approve selected reservations (book their GPUs)"))
    def approve(self, request, queryset) -> None:
        self._decide(request, queryset, True)

    @admin.action(description=_("Reject selected reservations"))
    def reject(self, request, queryset) -> None:
        self._decide(request, queryset, False)

    @admin.action(description=_("Simulate approving (what-if; saves nothing)"))
    def simulate(self, request, queryset):
        from django.shortcuts import redirect
        from django.urls import reverse

        first = queryset.order_by("pk").first()
        return redirect(f"{reverse('admin-what-if')}?reservation={first.pk}")


@admin.register(ReservationPolicy)
class ReservationPolicyAdmin(admin.ModelAdmin):
    list_display = ["tenant", "auto_approve_gpu_hours_per_week"]
    autocomplete_fields = ["tenant"]
