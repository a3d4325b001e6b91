"""/metrics: Prometheus text format with the seed's scheduler, GPU and quota
metrics, computed from the database so every web process reports the same."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from kernel import counters
from kernel.models import Alert
from nodes.models import GPU
from portal import metrics
from scheduling import usage
from scheduling.models import Allocation, GpuAllocationCount, Task, TaskEvent


def _scrape(client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.content.decode())}
    return families


def _value(families, name: str, sample: str | None = None, **labels) -> float:
    family = families[name]
    matches = [s.value for s in family.samples
               if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, family.samples)
    return matches[0]


@pytest.fixture
def busy_cluster(acme, globex, alice, servers):
    now = timezone.now()
    gpu = servers[0].gpus.get(index=0)
    GPU.objects.filter(pk=gpu.pk).update(memory_used_mb=1000, utilization_pct=77, temperature_c=65)
    GPU.objects.filter(pk=servers[1].gpus.get(index=2).pk).update(health="error", cordoned=True)
    running = Task.objects.create(tenant=acme, name="run", command="x", status="running", node=servers[0],
                                  created_at=now - timedelta(seconds=40), assigned_at=now - timedelta(seconds=10))
    Allocation.objects.create(task=running, gpu=gpu, node=servers[0], memory_mb=30_000)
    TaskEvent.objects.create(task=running, from_status="pending", to_status="assigned", actor="scheduler")
    old = Task.objects.create(tenant=acme, name="old", command="x", status="succeeded", node=servers[0],
                              created_at=now - timedelta(hours=1),
                              assigned_at=now - timedelta(hours=1) + timedelta(seconds=3))
    Allocation.objects.create(task=old, gpu=gpu, node=servers[0], memory_mb=1000,
                              allocated_at=now - timedelta(hours=1), released_at=now)
    TaskEvent.objects.create(task=old, from_status="pending", to_status="assigned", actor="scheduler")
    Task.objects.create(tenant=acme, name="p1", command="x", priority=2, created_at=now - timedelta(seconds=90))
    Task.objects.create(tenant=globex, name="p2", command="x", priority=2)
    Task.objects.create(tenant=globex, name="p3", command="x", priority=0)
    servers[0].last_heartbeat_at = now
    servers[0].save()
    Alert.objects.create(kind="gpu_error", message="gpu-02:2 error")
    return running


def test_metrics_parse_and_carry_every_seed_name(client, busy_cluster):
    families = _scrape(client)
    for name in ["scheduler_queue_size", "scheduler_queue_wait_seconds", "scheduler_schedule",
                 "scheduler_schedule_failures", "scheduler_pass_duration_seconds", "gpu_memory_used_bytes",
                 "gpu_memory_total_bytes", "gpu_utilization_percent", "gpu_temperature_celsius", "gpu_tasks",
                 "tenant_quota_used", "tenant_quota_limit", "node_up", "gpu_health_error"]:
        assert name in families, name
    # Counters are exposed with the _total suffix, as Prometheus expects.
    body = client.get("/metrics").content.decode()
    for sample in ["scheduler_schedule_total ", "scheduler_schedule_failures_total ", "gpu_tasks_total{"]:
        assert sample in body, sample


def test_queue_metrics_count_pending_tasks_by_priority_and_their_waits(client, busy_cluster):
    f = _scrape(client)
    assert _value(f, "scheduler_queue_size", priority="HIGH") == 2
    assert _value(f, "scheduler_queue_size", priority="LOW") == 1
    assert _value(f, "scheduler_queue_size", priority="CRITICAL") == 0
    assert 89 <= _value(f, "scheduler_queue_oldest_wait_seconds") < 200
    # Two placed tasks waited 30 s and 3 s.
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_count") == 2
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="5.0") == 1
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="30.0") == 2
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_sum") == pytest.approx(33, abs=1)
    assert _value(f, "scheduler_schedule", "scheduler_schedule_total") == 2


def test_gpu_task_counts_hold_across_the_usage_roll_up(client, busy_cluster, servers):
    labels = {"node": "gpu-01", "gpu": "0"}
    before = _value(_scrape(client), "gpu_tasks", "gpu_tasks_total", **labels)
    usage.roll_up(timezone.now() + usage.ROLLUP_LAG + timedelta(minutes=1))  # "old" is rolled up now
    assert GpuAllocationCount.objects.get(gpu=servers[0].gpus.get(index=0)).allocations == 1
    assert _value(_scrape(client), "gpu_tasks", "gpu_tasks_total", **labels) == before == 2


def test_gpu_metrics_report_each_gpu_as_last_reported(client, busy_cluster, servers):
    f = _scrape(client)
    labels = {"node": "gpu-01", "gpu": "0"}
    assert _value(f, "gpu_memory_used_bytes", **labels) == 1000 * 1024 * 1024
    assert _value(f, "gpu_memory_total_bytes", **labels) == 81_559 * 1024 * 1024
    assert _value(f, "gpu_utilization_percent", **labels) == 77
    assert _value(f, "gpu_temperature_celsius", **labels) == 65
    assert _value(f, "gpu_tasks", "gpu_tasks_total", **labels) == 2
    assert _value(f, "gpu_allocated_tasks", **labels) == 1
    assert _value(f, "gpu_health_error", node="gpu-02", gpu="2") == 1
    assert _value(f, "gpu_cordoned", node="gpu-02", gpu="2") == 1
    assert len(f["gpu_utilization_percent"].samples) == 16
    assert _value(f, "node_up", node="gpu-01") == 1
    assert _value(f, "node_up", node="gpu-02") == 0  # never heartbeated


def test_tenant_quota_usage_is_reported_beside_its_limits(client, busy_cluster):
    f = _scrape(client)
    assert _value(f, "tenant_quota_used", tenant="acme", resource="gpus") == 1
    assert _value(f, "tenant_quota_used", tenant="acme", resource="gpu_memory_mb") == 30_000
    assert _value(f, "tenant_quota_used", tenant="acme", resource="running_tasks") == 1
    assert _value(f, "tenant_quota_used", tenant="globex", resource="pending_tasks") == 2
    assert _value(f, "tenant_quota_limit", tenant="acme", resource="gpus") == 8
    assert _value(f, "tenant_quota_limit", tenant="globex", resource="running_tasks") == 4
    assert _value(f, "portal_alerts_open", kind="gpu_error") == 1


def test_scheduler_passes_recorded_anywhere_add_up(client, db):
    counters.record_pass(0.003)
    counters.record_pass(0.2)
    counters.record_pass(4.0, ok=False)
    f = _scrape(client)
    assert _value(f, "scheduler_passes", "scheduler_passes_total") == 3
    assert _value(f, "scheduler_schedule_failures", "scheduler_schedule_failures_total") == 1
    hist = "scheduler_pass_duration_seconds"
    assert _value(f, hist, f"{hist}_bucket", le="0.005") == 1
    assert _value(f, hist, f"{hist}_bucket", le="0.25") == 2
    assert _value(f, hist, f"{hist}_bucket", le="+Inf") == 3
    assert _value(f, hist, f"{hist}_sum") == pytest.approx(4.203)


def test_every_web_process_reports_the_same_figures(busy_cluster):
    """Two scrapes of the collector built fresh (as in two processes) agree,
    because nothing is kept in process memory."""
    first = {m.name: m.samples for m in metrics.collect_families() if m.name != "portal_metrics_scrape_seconds"}
    second = {m.name: m.samples for m in metrics.PortalCollector().collect()
              if m.name != "portal_metrics_scrape_seconds"}
    strip = {k: [(s.name, s.labels, s.value) for s in v if "oldest" not in s.name and "age" not in s.name]
             for k, v in first.items()}
    strip2 = {k: [(s.name, s.labels, s.value) for s in v if "oldest" not in s.name and "age" not in s.name]
              for k, v in second.items()}
    assert strip == strip2


def test_every_scheduler_pass_is_counted_in_the_metrics(client, servers):
    from scheduling.passes import run_pass

    run_pass()
    run_pass()
    f = _scrape(client)
    assert _value(f, "scheduler_passes", "scheduler_passes_total") == 2
    assert _value(f, "scheduler_pass_duration_seconds", "scheduler_pass_duration_seconds_count") == 2
    assert _value(f, "scheduler_schedule_failures", "scheduler_schedule_failures_total") == 0


def test_a_failing_pass_counts_as_a_schedule_failure(client, servers):
    from scheduling.passes import run_pass

    def broken(snapshot):
        raise RuntimeError("core bug")

    with pytest.raises(RuntimeError):
        run_pass(schedule=broken)
    f = _scrape(client)
    assert _value(f, "scheduler_schedule_failures", "scheduler_schedule_failures_total") == 1
