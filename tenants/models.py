"""Tenants (teams, labs), who belongs to them, and what each may use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pghistory
from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from tenants.choices import Priority, WorkloadClass


def default_classes() -> list[str]:
    return [WorkloadClass.ONLINE.value, WorkloadClass.BATCH.value]


@dataclass(frozen=True)
class Usage:
    gpus: int = 0
    gpu_memory_mb: int = 0
    running_tasks: int = 0
    pending_tasks: int = 0


class Tenant(models.Model):
    name = models.CharField(_("name"), max_length=100, unique=True)
    slug = models.SlugField(_("short name"), max_length=50, unique=True,
                            help_text=_("Short name used by the API and the CLI."))
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="tenants")

    class Meta:
        verbose_name = _("tenant")
        verbose_name_plural = _("tenants")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "member"
        ADMIN = "admin", "tenant admin"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = _("membership")
        verbose_name_plural = _("memberships")
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user_tenant"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class Quota(models.Model):
    """What a tenant may use at once. Lowering a limit never kills running tasks:
    it only stops new placements until usage falls below it."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota")
    max_gpus = models.PositiveIntegerField(_("max GPUs"), default=8, help_text=_("GPUs held at once."))
    max_gpu_memory_mb = models.PositiveBigIntegerField(_("max GPU memory (MB)"), default=8 * 80_000,
                                                       help_text=_("GPU memory held at once (MB)."))
    max_running_tasks = models.PositiveIntegerField(_("max running tasks"), default=16,
                                                    help_text=_("Assigned + running tasks at once."))
    max_pending_tasks = models.PositiveIntegerField(_("max pending tasks"), default=1000,
                                                    help_text=_("Tasks waiting in the queue at once."))
    max_priority = models.IntegerField(
        choices=Priority.choices, default=Priority.HIGH, help_text=_("Highest priority its tasks may ask for.")
    )
    allowed_classes = ArrayField(
        models.CharField(max_length=10),
        default=default_classes,
        help_text=_("Workload classes its tasks may use: online, batch."),
    )
    fair_share_weight = models.PositiveIntegerField(
        null=True, blank=True,
        help_text=_("Fair-share weight; empty: max GPUs. Its share is its weight over all tenants' weights."),
    )

    class Meta:
        verbose_name = _("quota")
        verbose_name_plural = _("quotas")
        constraints = [
            models.CheckConstraint(condition=Q(max_priority__gte=0) & Q(max_priority__lte=3),
                                   name="quota_max_priority_valid"),
            models.CheckConstraint(condition=Q(allowed_classes__contained_by=["online", "batch"]),
                                   name="quota_allowed_classes_known"),
        ]

    def __str__(self) -> str:
        return f"quota of {self.tenant}"

    def clean(self) -> None:
        unknown = sorted(set(self.allowed_classes or []) - set(WorkloadClass.values))
        if unknown:
            raise ValidationError(
                {"allowed_classes": f"Unknown workload class {', '.join(unknown)}: use online and/or batch."}
            )
        if len(set(self.allowed_classes or [])) != len(self.allowed_classes or []):
            raise ValidationError({"allowed_classes": "List each workload class once."})

    def exceeded_by(self, usage: Usage) -> list[str]:
        """The limits that current usage is already above (shown as warnings)."""
        over = []
        if usage.gpus > self.max_gpus:
            over.append(f"GPUs {usage.gpus} > {self.max_gpus}")
        if usage.gpu_memory_mb > self.max_gpu_memory_mb:
            over.append(f"GPU memory {usage.gpu_memory_mb} MB > {self.max_gpu_memory_mb} MB")
        if usage.running_tasks > self.max_running_tasks:
            over.append(f"running tasks {usage.running_tasks} > {self.max_running_tasks}")
        if usage.pending_tasks > self.max_pending_tasks:
            over.append(f"pending tasks {usage.pending_tasks} > {self.max_pending_tasks}")
        return over


class FairShare(models.Model):
    """A tenant's fair-share standing, refreshed once a minute (``scheduling.usage.refresh_fair_share``).

    ``factor = 2 ** (-usage / share)`` in [0, 1]: ``usage`` is the tenant's fraction of all
    tenants' GPU-seconds decayed with the configured half-life, ``share`` its fraction of all
    tenants' fair-share weights. 1: used nothing; 0.5: used exactly its share; towards 0: far over.
    """

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, primary_key=True, related_name="fair_share")
    decayed_gpu_seconds = models.FloatField(default=0)
    usage = models.FloatField(default=0)
    share = models.FloatField(default=0)
    factor = models.FloatField(default=1)
    computed_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(factor__gte=0) & Q(factor__lte=1), name="fairshare_factor_range"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant}: {self.factor:.2f}"


class ApiToken(models.Model):
    """A user's API token (for the REST API and the CLI), stored as prefix + HMAC."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text=_("What it is for, e.g. 'laptop CLI'."))
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    enabled = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = _("API token")
        verbose_name_plural = _("API tokens")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class QuotaGrant(models.Model):
    """Extra quota for a tenant over a window [starts_at, ends_at): requested by a tenant
    admin with a reason, approved or rejected by staff. While an approved grant's window
    covers ``now``, the scheduler's limits are the base quota plus every such grant
    (``effective_limits``). The sweep stamps ``applied_at``/``expired_at`` once each, with a
    notice, and wakes the scheduler at both bounds."""

    class State(models.TextChoices):
        REQUESTED = "requested", _("requested")
        APPROVED = "approved", _("approved")
        REJECTED = "rejected", _("rejected")

    class Status(models.TextChoices):
        """What a grant is at a moment (``status_at``): its state until approved, then where its window stands."""

        REQUESTED = "requested", "requested"
        REJECTED = "rejected", "rejected"
        UPCOMING = "upcoming", "upcoming"
        ACTIVE = "active", "active"
        EXPIRED = "expired", "expired"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_grants", verbose_name=_("tenant"))
    extra_gpus = models.PositiveIntegerField(_("extra GPUs"), default=0)
    extra_gpu_memory_mb = models.PositiveBigIntegerField(_("extra GPU memory (MB)"), default=0)
    extra_running_tasks = models.PositiveIntegerField(_("extra running tasks"), default=0)
    starts_at = models.DateTimeField(_("from"))
    ends_at = models.DateTimeField(_("until"))
    reason = models.CharField(_("reason"), max_length=500)
    state = models.CharField(_("state"), max_length=10, choices=State.choices, default=State.REQUESTED)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="quota_grants_requested", verbose_name=_("requested by"))
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="quota_grants_decided", verbose_name=_("decided by"))
    decided_at = models.DateTimeField(_("decided at"), null=True, blank=True)
    # Stamped by the sweep when the window opens / closes for an approved grant (one notice each).
    applied_at = models.DateTimeField(_("applied at"), null=True, blank=True)
    expired_at = models.DateTimeField(_("expired at"), null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-starts_at", "-id"]
        verbose_name = _("quota grant")
        verbose_name_plural = _("quota grants")
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__gt=models.F("starts_at")), name="quotagrant_window_valid"),
            models.CheckConstraint(
                condition=Q(extra_gpus__gt=0) | Q(extra_gpu_memory_mb__gt=0) | Q(extra_running_tasks__gt=0),
                name="quotagrant_grants_something"),
        ]
        indexes = [models.Index(fields=["ends_at"], name="quotagrant_approved_end_idx",
                                condition=Q(state="approved"))]

    def __str__(self) -> str:
        return f"grant #{self.pk} for {self.tenant}: {self.extras_text()}"

    def extras_text(self) -> str:
        parts = []
        if self.extra_gpus:
            parts.append(f"+{self.extra_gpus} GPUs")
        if self.extra_gpu_memory_mb:
            parts.append(f"+{self.extra_gpu_memory_mb} MB GPU memory")
        if self.extra_running_tasks:
            parts.append(f"+{self.extra_running_tasks} running tasks")
        return ", ".join(parts) or "nothing"

    def clean(self) -> None:
        errors = {}
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            errors["ends_at"] = _("The window must end after it starts.")
        if not (self.extra_gpus or self.extra_gpu_memory_mb or self.extra_running_tasks):
            errors["extra_gpus"] = _("Grant at least one extra GPU, MB of GPU memory or running task.")
        if errors:
            raise ValidationError(errors)

    def active_at(self, now) -> bool:
        return self.state == self.State.APPROVED and self.starts_at <= now < self.ends_at

    def status_at(self, now) -> QuotaGrant.Status:
        if self.state != self.State.APPROVED:
            return self.Status(self.state)
        if self.ends_at <= now:
            return self.Status.EXPIRED
        return self.Status.ACTIVE if self.starts_at <= now else self.Status.UPCOMING



# --- the audit: old -> new values of governance rows, recorded by database triggers
# (django-pghistory), whoever makes the change; who and through what is in portal.audit.
def _audit_events() -> tuple:
    # Fresh trackers per model: pghistory binds a tracker to the model it tracks.
    return pghistory.InsertEvent(), pghistory.UpdateEvent(), pghistory.DeleteEvent()


pghistory.track(*_audit_events())(Tenant)
pghistory.track(*_audit_events())(Membership)
pghistory.track(*_audit_events())(Quota)
# Never the digest; and last use is bookkeeping, not a change anyone made.
pghistory.track(*_audit_events(), exclude=["digest", "last_used_at"])(ApiToken)
pghistory.track(*_audit_events())(QuotaGrant)


@dataclass(frozen=True)
class Limits:
    max_gpus: int
    max_gpu_memory_mb: int
    max_running_tasks: int


def effective_limits(base: Limits, grants: Iterable, now) -> Limits:
    """Base quota plus every approved grant whose window [starts_at, ends_at) holds ``now``.

    ``grants`` are QuotaGrant rows or anything with the same attributes; pure, so the
    scheduler's snapshot and every page that shows a quota agree at any given instant."""
    gpus, mem, running = base.max_gpus, base.max_gpu_memory_mb, base.max_running_tasks
    for g in grants:
        if g.state == QuotaGrant.State.APPROVED and g.starts_at <= now < g.ends_at:
            gpus += g.extra_gpus
            mem += g.extra_gpu_memory_mb
            running += g.extra_running_tasks
    return Limits(gpus, mem, running)
