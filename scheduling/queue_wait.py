"""The queue-wait alert: the operator hears when a task waits too long for reasons
that are not its own tenant's quota. Run every minute by the sweep schedule."""

from __future__ import annotations

from django.conf import settings
from django.db.models import F, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from kernel.alerts import raise_alert
from kernel.models import Alert
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskEvent
from scheduling.quotas import usage_of
from tenants.models import Quota


def check_queue_wait(now=None) -> Alert | None:
    """Raise a ``queue_wait`` alert when a pending task has waited longer than
    ``ALERT_QUEUE_WAIT_S`` (0 turns it off) since it last entered the queue (its
    submission or its latest requeue). Tasks held by their own tenant's quota are
    the tenant's business, not the operator's, and do not count. Run every minute by
    the sweep schedule; one open alert at a time (acknowledge it to be told again)."""
    limit = settings.ALERT_QUEUE_WAIT_S
    if not limit:
        return None
    now = now or timezone.now()
    entered = (TaskEvent.objects.filter(task=OuterRef("pk"), to_status=TaskStatus.PENDING)
               .order_by("-created_at").values("created_at")[:1])
    queue = (Task.objects.filter(status=TaskStatus.PENDING)
             .annotate(waiting_since=Coalesce(Subquery(entered), F("created_at")))
             .order_by("waiting_since", "pk")
             .values_list("pk", "name", "tenant_id", "gpu_count", "gpu_memory_mb", "waiting_since"))
    quotas: dict[int, Quota | None] = {}
    usages: dict = {}
    for pk, name, tenant_id, gpu_count, memory_mb, since in queue.iterator(chunk_size=500):
        waited = (now - since).total_seconds()
        if waited <= limit:
            return None  # the queue is in waiting order: nobody after this one waited longer
        if tenant_id not in quotas:
            quotas[tenant_id] = Quota.objects.filter(tenant_id=tenant_id).first()
            usages.update(usage_of([tenant_id]))
        quota, usage = quotas[tenant_id], usages[tenant_id]
        if quota is not None and (
                usage.gpus + gpu_count > quota.max_gpus or usage.running_tasks >= quota.max_running_tasks
                or (memory_mb is not None and usage.gpu_memory_mb + gpu_count * memory_mb > quota.max_gpu_memory_mb)):
            continue  # held by its own tenant's quota
        pending = Task.objects.filter(status=TaskStatus.PENDING).count()
        return raise_alert(Alert.Kind.QUEUE_WAIT,
                           f"{pending} task(s) pending; #{pk} {name} has waited {int(waited // 60)} min "
                           f"since it entered the queue (alert threshold {limit} s)")
    return None
