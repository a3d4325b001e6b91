from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.postgres.forms import SimpleArrayField
from django.db.models import Count, IntegerField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from scheduling import grants, triggers
from scheduling.choices import ACTIVE_STATUSES
from scheduling.models import Allocation, Task
from scheduling.quotas import usage_of
from tenants.choices import WorkloadClass
from tenants.models import ApiToken, Membership, Quota, QuotaGrant, Tenant


class QuotaForm(forms.ModelForm):
    allowed_classes = SimpleArrayField(
        forms.CharField(max_length=10),
        help_text="Comma-separated: online, batch.",
        error_messages={"item_invalid": "Item %(nth)s: "},
    )

    class Meta:
        model = Quota
        fields = ["max_gpus", "max_gpu_memory_mb", "max_running_tasks", "max_pending_tasks",
                  "max_priority", "allowed_classes"]

    def clean_allowed_classes(self) -> list[str]:
        values = [v.strip().lower() for v in self.cleaned_data["allowed_classes"]]
        unknown = sorted(set(values) - set(WorkloadClass.values))
        if unknown:
            raise forms.ValidationError(f"Unknown workload class {', '.join(unknown)}: use online and/or batch.")
        if len(set(values)) != len(values):
            raise forms.ValidationError("List each workload class once.")
        return values


class QuotaInline(admin.StackedInline):
    model = Quota
    form = QuotaForm
    can_delete = False
    min_num = 1
    max_num = 1


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


def _usage_subqueries():

    active = Allocation.objects.filter(task__tenant=OuterRef("pk"), released_at__isnull=True)
    gpus = active.values("task__tenant").annotate(n=Count("gpu_id", distinct=True)).values("n")
    memory = active.values("task__tenant").annotate(m=Sum("memory_mb")).values("m")
    running = (
        Task.objects.filter(tenant=OuterRef("pk"), status__in=ACTIVE_STATUSES)
        .values("tenant").annotate(n=Count("id")).values("n")
    )
    zero = Value(0, output_field=IntegerField())
    return {
        "used_gpus": Coalesce(Subquery(gpus, output_field=IntegerField()), zero),
        "used_memory": Coalesce(Subquery(memory, output_field=IntegerField()), zero),
        "used_running": Coalesce(Subquery(running, output_field=IntegerField()), zero),
    }


def _grant_subqueries():
    """Extra quota from grants active now, per tenant: the list shows effective limits."""
    from django.utils import timezone

    now = timezone.now()
    active = QuotaGrant.objects.filter(tenant=OuterRef("pk"), state=QuotaGrant.State.APPROVED, starts_at__lte=now,
                                       ends_at__gt=now).values("tenant")
    zero = Value(0, output_field=IntegerField())
    return {
        f"granted_{key}": Coalesce(Subquery(active.annotate(s=Sum(field)).values("s"), output_field=IntegerField()),
                                   zero)
        for key, field in (("gpus", "extra_gpus"), ("memory", "extra_gpu_memory_mb"),
                           ("running", "extra_running_tasks"))
    }


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "gpus", "gpu_memory", "running_tasks", "members_count", "fair_share_factor"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [QuotaInline, MembershipInline]
    readonly_fields = ["usage_vs_limits"]
    # Adds "Simulate" beside Save: posts the form to the what-if page, which saves nothing.
    change_form_template = "admin/tenants/tenant/change_form.html"
    fields = ["name", "slug", "description", "usage_vs_limits"]

    def get_queryset(self, request):
        return (
            super().get_queryset(request)
            .select_related("quota", "fair_share")
            .annotate(members_n=Count("memberships", distinct=True), **_usage_subqueries(), **_grant_subqueries())
        )

    @staticmethod
    def _of(obj: Tenant, key: str, used: int, limit: int | None, unit: str = "", granted: int = 0):
        """Usage beside its effective limit (base + active grants); the used part is kept
        current by portal/static/portal/live.js."""
        if limit is not None and granted:
            suffix = f" / {limit + granted}{unit} (incl. +{granted} granted)"
        else:
            suffix = " / " + (f"{limit}{unit}" if limit is not None else "no quota")
        return format_html('<span data-tenant="{}" data-usage="{}" data-unit="{}" data-suffix="{}">{}{}{}</span>',
                           obj.pk, key, unit, suffix, used, unit, suffix)

    @admin.display(description=_("fair-share factor"), ordering="fair_share__factor")
    def fair_share_factor(self, obj: Tenant) -> str:
        """2^(-usage/share): 1 used nothing, 0.5 used exactly its share, towards 0 far over it."""
        fs = getattr(obj, "fair_share", None)
        if fs is None:
            return "-"
        return f"{fs.factor:.2f} (usage {fs.usage:.0%} / share {fs.share:.0%})"

    @admin.display(description=_("GPUs used / limit"), ordering="used_gpus")
    def gpus(self, obj: Tenant):
        return self._of(obj, "gpus", obj.used_gpus, getattr(getattr(obj, "quota", None), "max_gpus", None),
                        granted=obj.granted_gpus)

    @admin.display(description=_("GPU memory used / limit"), ordering="used_memory")
    def gpu_memory(self, obj: Tenant):
        return self._of(obj, "gpu_memory_mb", obj.used_memory,
                        getattr(getattr(obj, "quota", None), "max_gpu_memory_mb", None), " MB",
                        granted=obj.granted_memory)

    @admin.display(description=_("running tasks / limit"), ordering="used_running")
    def running_tasks(self, obj: Tenant):
        return self._of(obj, "running_tasks", obj.used_running,
                        getattr(getattr(obj, "quota", None), "max_running_tasks", None), granted=obj.granted_running)

    @admin.display(description=_("members"), ordering="members_n")
    def members_count(self, obj: Tenant) -> int:
        return obj.members_n

    @admin.display(description=_("current usage beside each limit"))
    def usage_vs_limits(self, obj: Tenant):
        if obj.pk is None:
            return "—"
        usage = usage_of([obj.pk])[obj.pk]
        quota = getattr(obj, "quota", None)
        rows = [
            ("GPUs", "gpus", usage.gpus, quota and quota.max_gpus),
            ("GPU memory (MB)", "gpu_memory_mb", usage.gpu_memory_mb, quota and quota.max_gpu_memory_mb),
            ("running tasks", "running_tasks", usage.running_tasks, quota and quota.max_running_tasks),
            ("pending tasks", "pending_tasks", usage.pending_tasks, quota and quota.max_pending_tasks),
        ]
        return format_html_join(
            "", '<div class="usage-row" data-limit="{}"><strong>{}</strong>: '
                '<span data-tenant="{}" data-usage="{}">{}</span> of {}</div>',
            ((label, label, obj.pk, key, used, limit if limit is not None else "no quota")
             for label, key, used, limit in rows),
        )

    def save_related(self, request, form, formsets, change) -> None:
        super().save_related(request, form, formsets, change)
        tenant = form.instance
        # A raised limit may let waiting tasks start now, not at the next periodic pass.
        triggers.request_pass(f"quota of {tenant.slug} changed by {request.user.username}")
        quota = Quota.objects.filter(tenant=tenant).first()
        if quota is None:
            return
        over = quota.exceeded_by(usage_of([tenant.pk])[tenant.pk])
        if over:
            messages.warning(
                request,
                _("Quota of %(slug)s saved below current usage (%(over)s). Running tasks keep running; no new task of "
                  "this tenant is placed until usage falls below the limits.") % {"slug": tenant.slug,
                                                                                   "over": "; ".join(over)},
            )


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__slug"]
    autocomplete_fields = ["user", "tenant"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "enabled", "expires_at", "last_used_at", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["prefix", "last_used_at", "created_at"]
    fields = ["user", "name", "enabled", "expires_at", "prefix", "last_used_at", "created_at"]

    def has_add_permission(self, request) -> bool:
        # Tokens are made by their users on the portal's tokens page, where the secret is shown once.
        return False




@admin.register(QuotaGrant)
class QuotaGrantAdmin(admin.ModelAdmin):
    """Staff approve or reject tenants' requests for temporary extra quota."""

    list_display = ["id", "tenant", "extras", "starts_at", "ends_at", "state", "window", "requested_by",
                    "decided_by", "reason"]
    list_filter = ["state", "tenant"]
    search_fields = ["tenant__slug", "reason"]
    autocomplete_fields = ["tenant"]
    readonly_fields = ["requested_by", "decided_by", "decided_at", "applied_at", "expired_at", "created_at"]
    actions = ["approve", "reject", "simulate"]

    @admin.display(description=_("grants"))
    def extras(self, obj: QuotaGrant) -> str:
        return obj.extras_text()

    @admin.display(description=_("now"))
    def window(self, obj: QuotaGrant) -> str:
        from django.utils import timezone

        now = timezone.now()
        if obj.state != QuotaGrant.State.APPROVED:
            return "—"
        return obj.status_at(now)

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            obj.requested_by = request.user
        if obj.state != QuotaGrant.State.REQUESTED and (not change or "state" in form.changed_data):
            from django.utils import timezone

            obj.decided_by, obj.decided_at = request.user, timezone.now()
        super().save_model(request, obj, form, change)
        if obj.state == QuotaGrant.State.APPROVED:
            # Whatever changed (window, amounts), the next pass must see it now.
            triggers.request_pass(f"quota grant #{obj.pk} for {obj.tenant.slug} saved by {request.user.username}")

    def _decide(self, request, queryset, approve: bool) -> None:
        done, refused = [], []
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                grants.decide(pk, approve=approve, by=request.user)
                done.append(f"#{pk}")
            except ValueError as exc:
                refused.append(str(exc))
        if done:
            text = _("Approved %(ids)s.") if approve else _("Rejected %(ids)s.")
            messages.success(request, text % {"ids": ", ".join(done)})
        for text in refused:
            messages.warning(request, text)

    @admin.action(description=_("Approve selected grant requests"))
    def approve(self, request, queryset) -> None:
        self._decide(request, queryset, True)

    @admin.action(description=_("Reject selected grant requests"))
    def reject(self, request, queryset) -> None:
        self._decide(request, queryset, False)

    @admin.action(description=_("Simulate approving (what-if; saves nothing)"))
    def simulate(self, request, queryset):
        from django.shortcuts import redirect
        from django.urls import reverse

        first = queryset.order_by("pk").first()
        return redirect(f"{reverse('admin-what-if')}?grant={first.pk}")
