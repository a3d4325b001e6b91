from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import OuterRef, Subquery
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import gettext_noop

from kernel import live
from kernel.alerts import raise_alert
from nodes import inventory
from nodes.enrolment import allow_reenrolment, issue_join_token
from nodes.gpu_state import gpu_state
from nodes.models import GPU, JoinToken, Node, NodeStatus
from scheduling import triggers
from scheduling.models import Allocation


class GPUInline(admin.TabularInline):
    model = GPU
    extra = 0
    fields = ["index", "uuid", "model_name", "memory_used_mb", "memory_total_mb", "utilization_pct",
              "temperature_c", "power_w", "health", "cordoned", "cordon_reason", "reserved"]
    readonly_fields = ["memory_used_mb", "utilization_pct", "temperature_c", "power_w", "health"]
    show_change_link = True


def _live(kind: str, pk: int, field: str, value, css: str = ""):
    """A cell that portal/static/portal/live.js keeps current."""
    return format_html('<span data-{}="{}" data-field="{}" class="{}">{}</span>', kind, pk, field, css, value)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "live_status", "intent", "heartbeat", "gpu_count", "gpus_busy", "agent_version",
                    "labels"]
    list_filter = ["status", "intent"]
    search_fields = ["name", "hostname"]
    readonly_fields = ["intent", "last_heartbeat_at", "agent_version", "token_prefix", "created_at", "updated_at"]
    fields = ["name", "hostname", "labels", "status", "intent", "status_reason", "last_heartbeat_at", "agent_version",
              "token_prefix", "created_at", "updated_at"]
    inlines = [GPUInline]
    actions = ["drain", "resume", "maintenance", "make_join_token", "allow_reenrolment"]

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        # Status, labels, cordon or reserved flags edited on the form change what can be placed.
        triggers.request_pass(f"{obj} edited by {request.user.username}")

    def get_queryset(self, request):
        return inventory.with_gpu_counts(super().get_queryset(request))

    @admin.display(description=_("status"), ordering="status")
    def live_status(self, obj: Node):
        return _live("node", obj.pk, "status", obj.get_status_display(), f"node-status status-{obj.status}")

    @admin.display(description=_("GPUs"), ordering="gpu_n")
    def gpu_count(self, obj: Node):
        return _live("node", obj.pk, "gpus", obj.gpu_n)

    @admin.display(description=_("GPUs busy"), ordering="busy_n")
    def gpus_busy(self, obj: Node):
        return _live("node", obj.pk, "gpus_busy", obj.busy_n)

    @admin.display(description=_("last heartbeat"), ordering="last_heartbeat_at")
    def heartbeat(self, obj: Node):
        age = obj.heartbeat_age()
        text = _("never") if age is None else _("%(s)s s ago") % {"s": int(age.total_seconds())}
        colour = "#c00" if obj.heartbeat_overdue else "inherit"
        return format_html('<span data-node="{}" data-field="heartbeat" style="color:{}">{}</span>',
                           obj.pk, colour, text)

    def _set_status(self, request, queryset, status: str, verb: str) -> None:
        """Change each server's status under its row lock, audit it (admin history,
        LogEntry) and tell live pages and the scheduler after commit."""

        changed = []
        ids = list(queryset.values_list("pk", flat=True))  # the list's queryset is annotated (GROUP BY)
        with transaction.atomic():
            for node in Node.objects.filter(pk__in=ids).select_for_update().order_by("pk"):
                if node.intent == status and node.status in (status, NodeStatus.OFFLINE):
                    continue
                before = node.status
                node.set_intent(status, f"{verb} by {request.user.username}")
                self.log_change(request, node, f"{verb}: status {before} -> {status}")
                changed.append(node.pk)
            live.gpus_changed(changed)
            if changed:
                triggers.request_pass(f"{len(changed)} server(s) {verb} by {request.user.username}")
        self.message_user(request, _("%(n)s server(s) %(verb)s.") % {"n": len(changed), "verb": _(verb)},
                          messages.SUCCESS)

    @admin.action(description=_("Drain: finish running tasks, take no new ones"))
    def drain(self, request, queryset) -> None:
        self._set_status(request, queryset, NodeStatus.DRAINING, gettext_noop("drained"))

    @admin.action(description=_("Resume: accept tasks again"))
    def resume(self, request, queryset) -> None:
        self._set_status(request, queryset, NodeStatus.ACTIVE, gettext_noop("resumed"))

    @admin.action(description=_("Make a one-time join token for the agent (shown once)"))
    def make_join_token(self, request, queryset) -> None:
        for node in queryset.order_by("name"):
            secret = issue_join_token(node, note=f"made by {request.user.username}", ttl=timedelta(days=1))
            self.message_user(
                request,
                f"Join token for {node.name} (valid 24 h, once; shown only now): {secret}  -  on the server run: "
                f"GPU_AGENT_JOIN_TOKEN={secret} python -m nodes.agent --portal <URL> --name {node.name}",
                messages.WARNING,
            )

    @admin.action(description=_("Revoke the node token; the server may enrol again by name once"))
    def allow_reenrolment(self, request, queryset) -> None:
        for node in queryset:
            allow_reenrolment(node)
        self.message_user(request, _("%(n)s server(s): node token revoked; the next agent to enrol with a cluster "
                                     "join token under that name takes the server over.") % {"n": queryset.count()})

    # (main stacked this decorator on allow_reenrolment, which then read "Maintenance" in the
    # action list while maintenance() was no action at all.)
    @admin.action(description=_("Maintenance: take out of service"))
    def maintenance(self, request, queryset) -> None:
        self._set_status(request, queryset, NodeStatus.MAINTENANCE, gettext_noop("put in maintenance"))


@admin.register(GPU)
class GPUAdmin(admin.ModelAdmin):
    list_display = ["__str__", "model_name", "live_state", "utilization", "memory", "temperature", "current_task",
                    "tenant", "health", "cordoned", "cordon_reason", "reserved"]
    list_filter = ["health", "cordoned", "reserved", "model_name", "node"]
    search_fields = ["uuid", "node__name", "model_name"]
    list_select_related = ["node"]
    readonly_fields = ["node", "index", "uuid", "model_name", "memory_total_mb", "memory_used_mb",
                       "utilization_pct", "temperature_c", "power_w", "health", "ecc_errors", "retired_pages",
                       "loaded_models", "idle_since", "updated_at"]
    actions = ["cordon", "uncordon"]


    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        # Status, labels, cordon or reserved flags edited on the form change what can be placed.
        triggers.request_pass(f"{obj} edited by {request.user.username}")

    def get_queryset(self, request):

        # The first task holding each GPU, in the same query (a shared GPU shows its oldest task).
        active = Allocation.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True).order_by("allocated_at", "id")
        return super().get_queryset(request).annotate(
            task_now=Subquery(active.values("task_id")[:1]),
            task_name_now=Subquery(active.values("task__name")[:1]),
            tenant_now=Subquery(active.values("task__tenant__slug")[:1]),
        )

    @admin.display(description=_("state"))
    def live_state(self, obj: GPU):
        state = gpu_state(obj, obj.node, allocated=getattr(obj, "task_now", None) is not None)
        return _live("gpu", obj.pk, "state", state.label, f"gpu-state state-{state}")

    @admin.display(description=_("util %"), ordering="utilization_pct")
    def utilization(self, obj: GPU):
        return _live("gpu", obj.pk, "utilization_pct", obj.utilization_pct)

    @admin.display(description=_("temp °C"), ordering="temperature_c")
    def temperature(self, obj: GPU):
        return _live("gpu", obj.pk, "temperature_c", obj.temperature_c)

    @admin.display(description=_("memory used / total"), ordering="memory_used_mb")
    def memory(self, obj: GPU):
        pct = round(100 * obj.memory_used_mb / obj.memory_total_mb) if obj.memory_total_mb else 0
        return format_html(
            '<div class="membar" data-gpu="{}" data-field="memory"><div class="membar-fill" style="width:{}%"></div>'
            '<span class="membar-label">{} MB / {} MB</span></div>',
            obj.pk, pct, obj.memory_used_mb, obj.memory_total_mb,
        )

    @admin.display(description=_("task"))
    def current_task(self, obj: GPU):
        task = getattr(obj, "task_now", None)
        return _live("gpu", obj.pk, "task", f"#{task} {obj.task_name_now}" if task else "")

    @admin.display(description=_("tenant"))
    def tenant(self, obj: GPU):
        return _live("gpu", obj.pk, "tenant", getattr(obj, "tenant_now", None) or "")

    def _set_cordon(self, request, queryset, cordon: bool) -> int:

        changed: list[GPU] = []
        ids = list(queryset.values_list("pk", flat=True))
        with transaction.atomic():
            for gpu in GPU.objects.filter(pk__in=ids).select_related("node").select_for_update(of=("self",)) \
                    .order_by("pk"):
                if gpu.cordoned == cordon:
                    continue
                if cordon:
                    gpu.cordon(f"cordoned by {request.user.username}")
                    self.log_change(request, gpu, f"cordoned by {request.user.username}")
                    raise_alert("gpu_error", f"GPU {gpu} cordoned by {request.user.username}", node=gpu.node_id,
                                gpu=gpu, severity="info")
                else:
                    gpu.uncordon()
                    self.log_change(request, gpu, f"uncordoned by {request.user.username}")
                changed.append(gpu)
            live.gpus_changed(g.node_id for g in changed)
            if changed and not cordon:
                triggers.request_pass(f"{len(changed)} GPU(s) uncordoned")
        return len(changed)

    @admin.action(description=_("Cordon: take no new tasks"))
    def cordon(self, request, queryset) -> None:
        n = self._set_cordon(request, queryset, True)
        self.message_user(request, _("%(n)s GPU(s) cordoned.") % {"n": n}, messages.SUCCESS)

    @admin.action(description=_("Uncordon: accept tasks again"))
    def uncordon(self, request, queryset) -> None:
        n = self._set_cordon(request, queryset, False)
        self.message_user(request, _("%(n)s GPU(s) uncordoned.") % {"n": n}, messages.SUCCESS)


@admin.register(JoinToken)
class JoinTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "node", "note", "expires_at", "used_at", "revoked", "created_at"]
    list_filter = ["revoked"]
    readonly_fields = ["prefix", "used_at", "created_at"]
    fields = ["node", "note", "expires_at", "revoked", "prefix", "used_at", "created_at"]

    def has_add_permission(self, request) -> bool:
        # Made by the "join token" action on a server (or the cluster), which shows the secret once.
        return False
