"""/metrics: Prometheus text format with the seed's scheduler, GPU and quota
metrics, computed from the database so every web process reports the same."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from kernel import counters
from kernel.models import Alert, MetricCounter
from nodes.models import GPU
from portal import metrics
from scheduling import lifecycle, usage
from scheduling.models import Allocation, GpuAllocationCount, Task


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


def _place(task, gpu, at, memory_mb: int) -> None:
    placing = lifecycle.Placing(task_id=task.pk, tenant_id=task.tenant_id, node_id=gpu.node_id, reason="test",
                                memory_mb=memory_mb, exclusive=True, gpus=((gpu.pk, gpu.node_id),))
    with transaction.atomic(), lifecycle.batch() as fan:
        assert lifecycle.place_many([placing], actor="scheduler", now=at, fan=fan) == [placing]


@pytest.fixture
def busy_cluster(acme, globex, alice, servers):
    now = timezone.now()
    gpu = servers[0].gpus.get(index=0)
    GPU.objects.filter(pk=gpu.pk).update(memory_used_mb=1000, utilization_pct=77, temperature_c=65)
    GPU.objects.filter(pk=servers[1].gpus.get(index=2).pk).update(health="error", cordoned=True)
    # Two tasks placed the way passes place them (the placing statement counts them): "old"
    # waited 3 s an hour ago and has finished, "run" waited 30 s and is running on GPU 0.
    old = Task.objects.create(tenant=acme, name="old", command="x", created_at=now - timedelta(hours=1))
    _place(old, gpu, at=now - timedelta(hours=1) + timedelta(seconds=3), memory_mb=1000)
    Task.objects.filter(pk=old.pk).update(status="succeeded")
    Allocation.objects.filter(task=old).update(allocated_at=now - timedelta(hours=1), released_at=now)
    running = Task.objects.create(tenant=acme, name="run", command="x", created_at=now - timedelta(seconds=40))
    _place(running, gpu, at=now - timedelta(seconds=10), memory_mb=30_000)
    Task.objects.filter(pk=running.pk).update(status="running")
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


def test_a_pass_counts_its_placements_and_their_waits_as_it_places_them(client, acme, servers):
    from scheduling.passes import run_pass

    now = timezone.now()
    for i, waited in enumerate((2, 20, 2000)):
        Task.objects.create(tenant=acme, name=f"t{i}", command="x", gpu_memory_mb=10_000,
                            created_at=now - timedelta(seconds=waited))
    Task.objects.create(tenant=acme, name="too big", command="x", gpu_count=64)  # never placed
    assert run_pass().placements == 3
    f = _scrape(client)
    assert _value(f, "scheduler_schedule", "scheduler_schedule_total") == 3
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_count") == 3
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="5.0") == 1
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="60.0") == 2
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="3600.0") == 3
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_sum") == pytest.approx(2022, abs=5)
    assert run_pass().placements == 0
    assert _value(_scrape(client), "scheduler_schedule", "scheduler_schedule_total") == 3


def test_a_placing_whose_task_left_the_queue_counts_nothing(client, acme, servers):
    task = Task.objects.create(tenant=acme, name="gone", command="x", status="cancelled")
    placing = lifecycle.Placing(task_id=task.pk, tenant_id=acme.pk, node_id=servers[0].pk, reason="test",
                                memory_mb=1000, exclusive=True, gpus=((servers[0].gpus.first().pk, servers[0].pk),))
    with transaction.atomic(), lifecycle.batch() as fan:
        assert lifecycle.place_many([placing], actor="scheduler", now=timezone.now(), fan=fan) == []
    f = _scrape(client)
    assert _value(f, "scheduler_schedule", "scheduler_schedule_total") == 0
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_count") == 0
    assert _value(f, "scheduler_queue_wait_seconds", "scheduler_queue_wait_seconds_bucket", le="86400.0") == 0


def test_the_migration_seeds_the_placement_counters_from_the_history(client, busy_cluster):
    from django.db import connection

    seed = importlib.import_module("scheduling.migrations.0019_placement_counters").SEED_SQL
    counted = {(c.name, c.labels): c.value for c in MetricCounter.objects.all()}
    MetricCounter.objects.all().delete()  # as before the migration: placements in events only
    with connection.cursor() as cursor:
        cursor.execute(seed)
    assert {(c.name, c.labels): c.value for c in MetricCounter.objects.all()} == pytest.approx(counted)
    assert (counters.QUEUE_WAIT_BUCKET, counters.bucket_label(86400)) in counted
