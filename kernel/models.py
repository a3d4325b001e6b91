"""Control-plane state: which portal processes are alive, and operator alerts."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class ControlPlaneServer(models.Model):
    """A web, scheduler or worker process of the portal, registered with a heartbeat.
    Rows whose heartbeat is older than a few intervals are considered dead."""

    class Role(models.TextChoices):
        WEB = "web", "web"
        SCHEDULER = "scheduler", "scheduler"
        WORKER = "worker", "worker"

    name = models.CharField(max_length=200, unique=True, help_text="host:pid:role")
    role = models.CharField(max_length=10, choices=Role.choices)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    version = models.CharField(max_length=50, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    info = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = _("control-plane server")
        verbose_name_plural = _("control-plane servers")
        ordering = ["role", "name"]
        indexes = [models.Index(fields=["last_seen_at"], name="cpserver_last_seen_idx")]

    def __str__(self) -> str:
        return self.name


class Hearing(models.Model):
    """Whether the control plane has been able to hear agents, and since when (one row).

    Touched (``kernel.hearing.heard``) by every ingested agent heartbeat and by every web
    process's registry beat. A silence longer than ``hearing.gap_s()`` (the portal was
    stopped, the database or every web node was down) restarts ``listening_since``: no
    server is judged lost until the portal has listened for a full timeout since then.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    listening_since = models.DateTimeField()
    last_heard_at = models.DateTimeField()

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(id=1), name="hearing_single_row")]

    def __str__(self) -> str:
        return f"listening since {self.listening_since:%Y-%m-%d %H:%M:%S}"


class Alert(models.Model):
    class Kind(models.TextChoices):
        SERVER_LOST = "server_lost", "server lost"
        GPU_ERROR = "gpu_error", "GPU error / cordoned"
        TASK_OOM = "task_oom", "task out of memory"
        QUEUE_WAIT = "queue_wait", "queue wait high"
        MASS_SILENCE = "mass_silence", "most servers silent at once (no server declared lost)"
        QUOTA_GRANT = "quota_grant", "quota grant applied / expired"

    class Severity(models.TextChoices):
        INFO = "info", "info"
        WARNING = "warning", "warning"
        CRITICAL = "critical", "critical"

    kind = models.CharField(_("kind"), max_length=20, choices=Kind.choices)
    severity = models.CharField(_("severity"), max_length=10, choices=Severity.choices, default=Severity.WARNING)
    message = models.CharField(_("message"), max_length=500)
    node = models.ForeignKey("nodes.Node", null=True, blank=True, on_delete=models.CASCADE, related_name="alerts",
                             verbose_name=_("server"))
    gpu = models.ForeignKey("nodes.GPU", null=True, blank=True, on_delete=models.CASCADE, related_name="alerts")
    task = models.ForeignKey("scheduling.Task", null=True, blank=True, on_delete=models.CASCADE,
                             related_name="alerts")
    created_at = models.DateTimeField(_("raised"), default=timezone.now)
    acknowledged_at = models.DateTimeField(_("acknowledged"), null=True, blank=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        verbose_name = _("alert")
        verbose_name_plural = _("alerts")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["-created_at"], name="alert_open_idx", condition=Q(acknowledged_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


class MetricCounter(models.Model):
    """A monotonic counter shared by every process (scheduler passes on any node add
    to the same row), read by the /metrics collector of every web process."""

    name = models.CharField(max_length=100)
    labels = models.CharField(max_length=200, blank=True, help_text='e.g. le="0.1"')
    value = models.FloatField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["name", "labels"], name="metriccounter_unique_name_labels")]

    def __str__(self) -> str:
        return f"{self.name}{{{self.labels}}} = {self.value}"


class HistoryResolution(models.IntegerChoices):
    """Tiers of the downsampled history (``scheduling.history``): each keeps its own retention."""

    RAW = 0, "raw"
    MINUTE = 1, "per minute"
    HOUR = 2, "per hour"


class GpuSample(models.Model):
    """One GPU's utilisation, memory and temperature at ``at`` (the start of its bucket)."""

    # No database foreign key: a sample is checked when written (the sampling SELECT reads the
    # GPU itself), and a per-row RI trigger would be most of a sample's cost. Deleting a GPU
    # still deletes its history (Django's cascade).
    gpu = models.ForeignKey("nodes.GPU", on_delete=models.CASCADE, related_name="+", db_constraint=False)
    resolution = models.PositiveSmallIntegerField(choices=HistoryResolution.choices)
    at = models.DateTimeField()
    utilization_pct = models.FloatField()
    memory_used_mb = models.FloatField()
    temperature_c = models.FloatField()

    class Meta:
        verbose_name = _("GPU sample")
        verbose_name_plural = _("GPU samples")
        constraints = [models.UniqueConstraint(fields=["gpu", "resolution", "at"], name="gpusample_unique_bucket")]
        # Rollups and retention scan one tier by time, across GPUs.
        indexes = [models.Index(fields=["resolution", "at"], name="gpusample_tier_time_idx")]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} @ {self.at:%Y-%m-%d %H:%M:%S}"


class TenantSample(models.Model):
    """How many GPUs a tenant held at ``at``, beside its GPU quota then."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+", db_constraint=False)
    resolution = models.PositiveSmallIntegerField(choices=HistoryResolution.choices)
    at = models.DateTimeField()
    gpus_in_use = models.FloatField()
    gpu_quota = models.PositiveIntegerField(null=True)

    class Meta:
        verbose_name = _("tenant sample")
        verbose_name_plural = _("tenant samples")
        constraints = [models.UniqueConstraint(fields=["tenant", "resolution", "at"],
                                               name="tenantsample_unique_bucket")]
        indexes = [models.Index(fields=["resolution", "at"], name="tenantsample_tier_time_idx")]

    def __str__(self) -> str:
        return f"tenant {self.tenant_id} @ {self.at:%Y-%m-%d %H:%M:%S}"
