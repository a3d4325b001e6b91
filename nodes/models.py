"""GPU servers (nodes) and their GPUs, as last reported by each server's agent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import pghistory
from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext_lazy as _

from kernel import tokens


class NodeStatus(models.TextChoices):
    ACTIVE = "active", _("active")
    DRAINING = "draining", _("draining (no new tasks)")
    MAINTENANCE = "maintenance", _("maintenance")
    OFFLINE = "offline", _("offline")


# What an operator can ask of a server; "offline" is only ever observed, never intended.
INTENTS = (NodeStatus.ACTIVE, NodeStatus.DRAINING, NodeStatus.MAINTENANCE)
# Servers that run work and are expected to send heartbeats (sampled, swept, counted up).
MONITORED = (NodeStatus.ACTIVE, NodeStatus.DRAINING)


class GPUHealth(models.TextChoices):
    OK = "ok", "ok"
    WARNING = "warning", "warning"
    ERROR = "error", "error"


class Node(models.Model):
    name = models.CharField(_("name"), max_length=100, unique=True)
    hostname = models.CharField(_("hostname"), max_length=255, blank=True)
    labels = models.JSONField(_("labels"), default=dict, blank=True,
                              help_text=_('Scheduling labels, e.g. {"zone": "a", "ib": "yes"}.'))
    status = models.CharField(_("status"), max_length=12, choices=NodeStatus.choices, default=NodeStatus.OFFLINE)
    status_reason = models.CharField(max_length=255, blank=True)
    # The operator's intent, kept apart from observed health: a server that goes offline
    # and comes back returns to what the operator last asked (a drain is not forgotten).
    intent = models.CharField(max_length=12, choices=[(s.value, s.label) for s in INTENTS],
                              default=NodeStatus.ACTIVE)
    # Portal (database) time of the last heartbeat: agent clocks are never trusted.
    last_heartbeat_at = models.DateTimeField(_("last heartbeat"), null=True, blank=True)
    agent_version = models.CharField(_("agent version"), max_length=50, blank=True)
    token_prefix = models.CharField(max_length=32, null=True, blank=True, unique=True, editable=False)
    token_digest = models.CharField(max_length=64, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = _("GPU server")
        verbose_name_plural = _("GPU servers")
        # "GPU server" is what the README, the portal and the API call it.
        ordering = ["name"]
        indexes = [models.Index(fields=["status", "last_heartbeat_at"], name="node_status_heartbeat_idx")]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=NodeStatus.values), name="node_status_valid"),
            models.CheckConstraint(condition=Q(intent__in=[s.value for s in INTENTS]), name="node_intent_valid"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        # Whoever sets a status other than offline states an intent (the admin, the API, a
        # shell); the sweep setting "offline" records an observation and leaves the intent.
        if self.status != NodeStatus.OFFLINE and self.intent != self.status:
            self.intent = self.status
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "intent"}
        super().save(*args, **kwargs)

    def set_intent(self, intent: str, reason: str) -> None:
        """The operator asks for ``intent``; an offline server keeps its observed status
        until its next heartbeat brings it back, to the intent."""
        if intent not in INTENTS:
            raise ValueError(f"unknown intent {intent!r}")
        self.intent = intent
        if self.status != NodeStatus.OFFLINE:
            self.status = intent
        self.status_reason = reason[:255]
        self.save(update_fields=["intent", "status", "status_reason", "updated_at"])

    def issue_token(self) -> str:
        """Make a new node token, store its hash and return it (shown once)."""
        new = tokens.make_token("node")
        self.token_prefix, self.token_digest = new.prefix, new.digest
        self.save(update_fields=["token_prefix", "token_digest", "updated_at"])
        return new.token

    def is_schedulable(self) -> bool:
        return self.status == NodeStatus.ACTIVE

    def heartbeat_age(self) -> timedelta | None:
        return timezone.now() - self.last_heartbeat_at if self.last_heartbeat_at else None

    @property
    def heartbeat_overdue(self) -> bool:
        age = self.heartbeat_age()
        return age is None or age.total_seconds() > settings.SCHEDULER.heartbeat_timeout_s


def model_cache(cache: dict[str, str], *, now: datetime, ttl_s: int, used: Iterable[str] = (),
                max_models: int = 0) -> dict[str, datetime]:
    """A GPU's model cache as the scheduler sees it: entries used within ``ttl_s``, oldest use
    first (jsonb keeps no key order), ``used`` refreshed to ``now``; with ``max_models``, the
    least recently used beyond it are evicted (the seed's LRU of 2)."""
    out: dict[str, datetime] = {}
    for name, when in (cache or {}).items():
        parsed = parse_datetime(when) if isinstance(when, str) else None
        if parsed is not None and (now - parsed).total_seconds() <= ttl_s:
            out[name] = parsed
    for name in used:
        out[name] = now
    ordered = dict(sorted(out.items(), key=lambda item: item[1]))
    if max_models:
        while len(ordered) > max_models:
            ordered.pop(next(iter(ordered)))
    return ordered


def remember_models(used: Mapping[int, Iterable[str]]) -> None:
    """Record that these models were just used on these GPUs (gpu id -> model names: a task
    naming a model started there, or an agent saw the models loaded). Feeds the model-affinity
    score. Locks the GPU rows (call inside ``transaction.atomic()``) and writes them in one statement."""
    used = {gpu_id: [n for n in names if n] for gpu_id, names in used.items()}
    used = {gpu_id: names for gpu_id, names in used.items() if names}
    if not used:
        return
    config = settings.SCHEDULER
    now = timezone.now()
    # Stable order: the same rows are locked in the same order by every writer.
    gpus = list(GPU.objects.select_for_update().filter(pk__in=sorted(used)).order_by("pk").only("pk", "loaded_models"))
    for gpu in gpus:
        cache = model_cache(gpu.loaded_models, now=now, ttl_s=config.model_cache_ttl_seconds, used=used[gpu.pk],
                            max_models=config.max_models_per_gpu)
        gpu.loaded_models = {k: v.isoformat() for k, v in cache.items()}
    GPU.objects.bulk_update(gpus, ["loaded_models"])


class GPU(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus", verbose_name=_("server"))
    index = models.PositiveSmallIntegerField(_("index"), )
    uuid = models.CharField(max_length=64, unique=True)
    model_name = models.CharField(_("model"), max_length=100, help_text=_("e.g. NVIDIA H100 80GB HBM3"))
    memory_total_mb = models.PositiveIntegerField(_("memory total (MB)"))
    memory_used_mb = models.PositiveIntegerField(_("memory used (MB)"), default=0,
                                                 help_text=_("Live, as the agent last reported it."))
    utilization_pct = models.PositiveSmallIntegerField(_("utilisation (%)"), default=0)
    temperature_c = models.PositiveSmallIntegerField(_("temperature (°C)"), default=0)
    power_w = models.PositiveIntegerField(default=0)
    health = models.CharField(_("health"), max_length=8, choices=GPUHealth.choices, default=GPUHealth.OK)
    ecc_errors = models.PositiveBigIntegerField(default=0)
    retired_pages = models.PositiveIntegerField(default=0)
    cordoned = models.BooleanField(_("cordoned"), default=False,
                                   help_text=_("No new tasks; set automatically on GPU errors."))
    cordon_reason = models.CharField(max_length=255, blank=True)
    reserved = models.BooleanField(_("reserved"), default=False,
                                   help_text=_("Kept out of scheduling (e.g. for debugging)."))
    # {"deepseek-7b": "2026-11-22T10:00:00+00:00", ...}: models recently loaded, with last use.
    loaded_models = models.JSONField(default=dict, blank=True)
    # When the GPU last became idle (no active allocation); feeds the idle-time score.
    idle_since = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = _("GPU")
        verbose_name_plural = _("GPUs")
        ordering = ["node_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="gpu_unique_node_index"),
            # What an allocation's (GPU, server) refers to (scheduling.Allocation's allocation_gpu_on_its_server).
            models.UniqueConstraint(fields=["id", "node"], name="gpu_id_node_key"),
            models.CheckConstraint(condition=Q(utilization_pct__lte=100), name="gpu_utilization_pct_range"),
            models.CheckConstraint(condition=Q(memory_total_mb__gt=0), name="gpu_memory_total_positive"),
            models.CheckConstraint(condition=Q(health__in=GPUHealth.values), name="gpu_health_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.node.name}:{self.index}"

    @property
    def memory_free_mb(self) -> int:
        return max(self.memory_total_mb - self.memory_used_mb, 0)

    def cordon(self, reason: str) -> None:
        self.cordoned, self.cordon_reason = True, reason[:255]
        self.save(update_fields=["cordoned", "cordon_reason", "updated_at"])

    def uncordon(self) -> None:
        """The operator's word that the GPU is fit again: an error its agent reported is cleared
        with the cordon (heartbeats keep an error until then), so it is scheduled again."""
        self.cordoned, self.cordon_reason = False, ""
        if self.health == GPUHealth.ERROR:
            self.health = GPUHealth.OK  # the next heartbeat says whether it is ok or warning
        self.save(update_fields=["cordoned", "cordon_reason", "health", "updated_at"])


class JoinToken(models.Model):
    """Lets an agent enrol. Bound to one server (one-time, made in the admin) or
    cluster-wide (``node`` empty: agents self-register until it expires)."""

    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="join_tokens",
                             verbose_name=_("server"))
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    note = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    used_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = _("join token")
        verbose_name_plural = _("join tokens")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"join token {self.prefix}… ({self.node or 'cluster-wide'})"


# --- the audit (see tenants.models and portal.audit): operator state of servers and GPUs.
# Only these fields: live readings (heartbeats) change the rows every few seconds and
# fire no event, as an update event fires only when a tracked field changes.
def _audit_events() -> tuple:
    # Fresh trackers per model: pghistory binds a tracker to the model it tracks.
    return pghistory.InsertEvent(), pghistory.UpdateEvent(), pghistory.DeleteEvent()


# Named: pghistory would otherwise name the event model after the field list.
pghistory.track(*_audit_events(), fields=["name", "status", "intent", "status_reason", "labels", "token_prefix"],
                model_name="NodeEvent")(Node)
pghistory.track(*_audit_events(), fields=["node", "index", "cordoned", "cordon_reason", "reserved"],
                model_name="GPUEvent")(GPU)
pghistory.track(*_audit_events(), exclude=["digest"])(JoinToken)
