"""Scheduler, GPU and tenant metrics on /metrics, computed from the database at
scrape time.

Every web process registers ``PortalCollector``; whichever process Prometheus
scrapes reads the same rows, so several web nodes behind a load balancer report
the same truth (no per-process counters that reset or disagree). Counters come
from durable rows: placements and their queue waits from ``MetricCounter`` rows that the
placing statement adds to (``kernel.counters``), GPU task counts from allocations
(rolled up per GPU with the usage ledger: ``scheduling.usage.allocations_per_gpu``), pass
figures from ``MetricCounter`` rows that ``kernel.counters.record_pass`` adds to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

from kernel.counters import (
    PASS_BUCKETS,
    PLACEMENTS,
    QUEUE_WAIT_BUCKET,
    QUEUE_WAIT_BUCKETS,
    QUEUE_WAIT_SUM,
    bucket_label,
)
from kernel.models import Alert
from nodes.models import MONITORED, GPUHealth
from scheduling.choices import ACTIVE_STATUSES, OPEN_STATUSES, TaskStatus
from scheduling.usage import allocations_per_gpu
from tenants.choices import Priority

log = logging.getLogger(__name__)

MB = 1024 * 1024


def _families() -> dict[str, Metric]:
    gpu_labels = ["node", "gpu", "uuid", "model"]
    return {
        "queue_size": GaugeMetricFamily("scheduler_queue_size", "Tasks waiting in the queue.", labels=["priority"]),
        "queue_oldest": GaugeMetricFamily(
            "scheduler_queue_oldest_wait_seconds", "Age of the oldest pending task (0 when the queue is empty)."),
        "queue_wait": HistogramMetricFamily(
            "scheduler_queue_wait_seconds", "Time from submission to (latest) assignment of placed tasks."),
        "schedule": CounterMetricFamily("scheduler_schedule", "Tasks placed on GPUs by the scheduler."),
        "failures": CounterMetricFamily("scheduler_schedule_failures", "Scheduler passes that failed."),
        "passes": CounterMetricFamily("scheduler_passes", "Scheduler passes run."),
        "pass_duration": HistogramMetricFamily("scheduler_pass_duration_seconds", "Duration of scheduler passes."),
        "mem_used": GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use.", labels=gpu_labels),
        "mem_total": GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory in total.", labels=gpu_labels),
        "util": GaugeMetricFamily("gpu_utilization_percent", "GPU utilisation.", labels=gpu_labels),
        "temp": GaugeMetricFamily("gpu_temperature_celsius", "GPU temperature.", labels=gpu_labels),
        "gpu_tasks": CounterMetricFamily(
            "gpu_tasks", "Tasks ever allocated to the GPU (a task placed on it again counts again).",
            labels=gpu_labels),
        "gpu_busy": GaugeMetricFamily("gpu_allocated_tasks", "Tasks holding the GPU now.", labels=gpu_labels),
        "gpu_error": GaugeMetricFamily("gpu_health_error", "1 when the GPU reports an error.", labels=gpu_labels),
        "gpu_cordoned": GaugeMetricFamily("gpu_cordoned", "1 when the GPU takes no new tasks.", labels=gpu_labels),
        "node_up": GaugeMetricFamily(
            "node_up", "1 when the server is in service and heartbeating in time.", labels=["node", "status"]),
        "node_age": GaugeMetricFamily(
            "node_heartbeat_age_seconds", "Seconds since the server's last heartbeat.", labels=["node"]),
        "quota_used": GaugeMetricFamily(
            "tenant_quota_used", "Tenant usage counted against its quota.", labels=["tenant", "resource"]),
        "quota_limit": GaugeMetricFamily("tenant_quota_limit", "Tenant quota limit.", labels=["tenant", "resource"]),
        "alerts": GaugeMetricFamily("portal_alerts_open", "Unacknowledged alerts.", labels=["kind"]),
        "scrape": GaugeMetricFamily("portal_metrics_scrape_seconds", "Time spent reading these metrics."),
    }


def _query(sql: str, params: Iterable = ()) -> list[tuple]:
    with connection.cursor() as cur:
        cur.execute(sql, list(params))
        return cur.fetchall()


def _histogram(buckets: Iterable[float], counts: list[float], total: float,
               count: float) -> tuple[list[tuple[str, float]], float]:
    out = [(floatToGoString(b), c) for b, c in zip(buckets, counts, strict=True)]
    return [*out, ("+Inf", count)], total


def collect_families() -> list[Metric]:
    started = time.monotonic()
    f = _families()
    now = timezone.now()

    pending = [TaskStatus.PENDING]
    by_priority = dict(_query("SELECT priority, count(*) FROM scheduling_task WHERE status = %s GROUP BY 1", pending))
    for p in Priority:
        f["queue_size"].add_metric([p.label], by_priority.get(p.value, 0))
    (oldest,) = _query("SELECT min(created_at) FROM scheduling_task WHERE status = %s", pending)[0]
    f["queue_oldest"].add_metric([], max((now - oldest).total_seconds(), 0) if oldest else 0)

    # Placements and their waits: counted by the statement that placed them (kernel.counters).
    counters = {(name, labels): value for name, labels, value in _query(
        "SELECT name, labels, value FROM portal_metriccounter")}
    placed = counters.get((PLACEMENTS, ""), 0)
    wait_counts = [counters.get((QUEUE_WAIT_BUCKET, bucket_label(b)), 0) for b in QUEUE_WAIT_BUCKETS]
    buckets, total = _histogram(QUEUE_WAIT_BUCKETS, wait_counts, counters.get((QUEUE_WAIT_SUM, ""), 0), placed)
    f["queue_wait"].add_metric([], buckets, total)
    f["schedule"].add_metric([], placed)

    f["failures"].add_metric([], counters.get(("scheduler_schedule_failures", ""), 0))
    passes = counters.get(("scheduler_passes", ""), 0)
    f["passes"].add_metric([], passes)
    pass_counts = [counters.get(("scheduler_pass_duration_seconds_bucket", bucket_label(b)), 0) for b in PASS_BUCKETS]
    buckets, total = _histogram(PASS_BUCKETS, pass_counts,
                                counters.get(("scheduler_pass_duration_seconds_sum", ""), 0), passes)
    f["pass_duration"].add_metric([], buckets, total)

    # The open allocations in one aggregate (not a subquery per GPU): 8,000 GPUs stay cheap.
    # Those ever come from the usage roll-up's counts and the rows after its watermark.
    gpus = _query(
        "SELECT g.id, n.name, g.index, g.uuid, g.model_name, g.memory_used_mb, g.memory_total_mb,"
        " g.utilization_pct, g.temperature_c, g.health, g.cordoned, coalesce(a.now_n, 0)"
        " FROM nodes_gpu g JOIN nodes_node n ON n.id = g.node_id"
        " LEFT JOIN (SELECT gpu_id, count(*) AS now_n FROM scheduling_allocation"
        "            WHERE released_at IS NULL GROUP BY gpu_id) a ON a.gpu_id = g.id"
        " ORDER BY n.name, g.index"
    )
    ever = allocations_per_gpu()
    for gpu_id, node, index, uuid, model, used, total_mb, util, temp, health, cordoned, now_n in gpus:
        labels = [node, str(index), uuid, model]
        f["mem_used"].add_metric(labels, used * MB)
        f["mem_total"].add_metric(labels, total_mb * MB)
        f["util"].add_metric(labels, util)
        f["temp"].add_metric(labels, temp)
        f["gpu_tasks"].add_metric(labels, ever.get(gpu_id, 0))
        f["gpu_busy"].add_metric(labels, now_n)
        f["gpu_error"].add_metric(labels, 1 if health == GPUHealth.ERROR else 0)
        f["gpu_cordoned"].add_metric(labels, 1 if cordoned else 0)

    timeout = settings.SCHEDULER.heartbeat_timeout_s
    for name, status, seen in _query("SELECT name, status, last_heartbeat_at FROM nodes_node ORDER BY name"):
        age = (now - seen).total_seconds() if seen else None
        up = status in MONITORED and age is not None and age <= timeout
        f["node_up"].add_metric([name, status], 1 if up else 0)
        if age is not None:
            f["node_age"].add_metric([name], max(age, 0))

    usage = _query(
        "SELECT t.slug, coalesce(a.gpus, 0), coalesce(a.memory, 0), coalesce(k.running, 0), coalesce(k.pending, 0),"
        " q.max_gpus, q.max_gpu_memory_mb, q.max_running_tasks, q.max_pending_tasks"
        " FROM tenants_tenant t LEFT JOIN tenants_quota q ON q.tenant_id = t.id"
        " LEFT JOIN (SELECT k.tenant_id, count(DISTINCT a.gpu_id) AS gpus, sum(a.memory_mb) AS memory"
        "            FROM scheduling_allocation a JOIN scheduling_task k ON k.id = a.task_id"
        "            WHERE a.released_at IS NULL GROUP BY k.tenant_id) a ON a.tenant_id = t.id"
        " LEFT JOIN (SELECT tenant_id, count(*) FILTER (WHERE status = ANY(%s)) AS running,"
        "            count(*) FILTER (WHERE status = %s) AS pending"
        "            FROM scheduling_task WHERE status = ANY(%s) GROUP BY tenant_id) k"
        "   ON k.tenant_id = t.id"
        " ORDER BY t.slug", [list(ACTIVE_STATUSES), TaskStatus.PENDING, list(OPEN_STATUSES)]
    )
    resources = ("gpus", "gpu_memory_mb", "running_tasks", "pending_tasks")
    for slug, *values in usage:
        for resource, used in zip(resources, values[:4], strict=True):
            f["quota_used"].add_metric([slug, resource], used)
        for resource, limit in zip(resources, values[4:], strict=True):
            if limit is not None:
                f["quota_limit"].add_metric([slug, resource], limit)

    open_alerts = dict(_query("SELECT kind, count(*) FROM portal_alert WHERE acknowledged_at IS NULL GROUP BY 1"))

    for kind in Alert.Kind.values:
        f["alerts"].add_metric([kind], open_alerts.get(kind, 0))

    f["scrape"].add_metric([], time.monotonic() - started)
    return list(f.values())


class PortalCollector(Collector):
    def describe(self) -> Iterator[Metric]:
        # Names only, so registering never touches the database.
        return iter(_families().values())

    def collect(self) -> Iterator[Metric]:
        try:
            return iter(collect_families())
        except DatabaseError:
            # Keep the request/process metrics flowing when the database is away;
            # the scrape shows the gap (and alerts on absent series) instead of a 500.
            log.exception("could not read portal metrics from the database")
            return iter(())


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(PortalCollector())
        _registered = True
