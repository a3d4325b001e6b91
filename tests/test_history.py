"""GPU and tenant history: sampled from the database in one statement each, rolled up
per minute and per hour, old rows dropped per tier, read back at a bounded number of points."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from kernel.models import GpuSample, HistoryResolution, TenantSample
from nodes.models import GPU, Node
from scheduling import history
from scheduling.models import Allocation, Task
from tests.conftest import make_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def live_servers(servers):
    Node.objects.update(last_heartbeat_at=timezone.now())
    GPU.objects.update(utilization_pct=50, memory_used_mb=1000, temperature_c=40)
    return servers


def test_one_sample_is_one_statement_for_all_gpus_and_one_for_all_tenants(live_servers, acme, globex):
    task = Task.objects.create(tenant=acme, name="t", command="x", status="running", node=live_servers[0])
    for gpu in live_servers[0].gpus.all()[:3]:
        Allocation.objects.create(task=task, gpu=gpu, node=live_servers[0], memory_mb=1000)
    with CaptureQueriesContext(connection) as queries:
        assert history.sample() == 16
    assert len(queries) == 2
    assert GpuSample.objects.filter(resolution=HistoryResolution.RAW).count() == 16
    assert dict(TenantSample.objects.values_list("tenant__slug", "gpus_in_use")) == {"acme": 3, "globex": 0}
    assert TenantSample.objects.get(tenant=acme).gpu_quota == 8


def test_samples_in_one_bucket_are_written_once_and_silent_servers_are_skipped(live_servers, acme):
    make_server("gpu-03")  # never heard from: its numbers are not history
    now = timezone.now()
    history.sample(now)
    history.sample(now)  # a second scheduler in the same bucket
    assert GpuSample.objects.count() == 16
    Node.objects.filter(name="gpu-02").update(last_heartbeat_at=now - timedelta(minutes=10))
    assert history.sample(now + timedelta(seconds=10)) == 8


def test_raw_samples_roll_up_into_minutes_and_hours_and_old_rows_are_dropped(live_servers, acme, settings):
    gpu = GPU.objects.order_by("pk").first()
    now = timezone.now().replace(second=30, microsecond=0)
    for i, util in enumerate([10, 20, 30]):
        GPU.objects.filter(pk=gpu.pk).update(utilization_pct=util)
        history.sample(now - timedelta(seconds=20 - 10 * i))
    old = now - timedelta(days=2)
    GpuSample.objects.create(gpu=gpu, resolution=HistoryResolution.RAW, at=old, utilization_pct=1,
                             memory_used_mb=1, temperature_c=1)
    history.roll_up(now)
    minute = GpuSample.objects.get(gpu=gpu, resolution=HistoryResolution.MINUTE)
    assert (minute.at, minute.utilization_pct) == (now.replace(second=0), 20)
    hour = GpuSample.objects.get(gpu=gpu, resolution=HistoryResolution.HOUR)
    assert (hour.at, hour.utilization_pct) == (now.replace(minute=0, second=0), 20)
    assert not GpuSample.objects.filter(at=old).exists()  # raw is kept a day
    assert TenantSample.objects.filter(resolution=HistoryResolution.MINUTE, tenant=acme).exists()


def test_reads_pick_a_tier_that_covers_the_range_with_a_bounded_number_of_points():
    now = timezone.now()
    day = history.window(now - timedelta(hours=24), now, now)
    assert day.tier == HistoryResolution.RAW and 86_400 / day.step_s <= history.MAX_POINTS
    month = history.window(now - timedelta(days=30), now, now)
    assert month.tier == HistoryResolution.MINUTE and month.step_s % 60 == 0
    year = history.window(now - timedelta(days=365), now, now)
    assert year.tier == HistoryResolution.HOUR and year.step_s % 3600 == 0


def test_the_gpu_tenant_and_cluster_series_read_back_what_was_sampled(live_servers, acme):
    gpu = GPU.objects.order_by("pk").first()
    now = timezone.now()
    for i in range(3):
        GPU.objects.filter(pk=gpu.pk).update(utilization_pct=10 * (i + 1), temperature_c=60)
        history.sample(now - timedelta(minutes=30 - i * 10))
    w = history.window(now - timedelta(hours=1), now, now)
    series = history.gpu_history([gpu.pk], w)[gpu.pk]
    assert [v for _, v in series["utilization_pct"]] == [10, 20, 30]
    assert {v for _, v in series["temperature_c"]} == {60}
    assert [v for _, v in history.tenant_history(acme.pk, w)["gpu_quota"]] == [8, 8, 8]
    cluster = history.cluster_history(w)
    assert len(cluster["utilization_pct"]) == 3 and cluster["gpus_in_use"][0][1] == 0


@pytest.fixture
def sampled(live_servers, acme):
    now = timezone.now()
    for minutes_ago in (50, 30, 10):
        history.sample(now - timedelta(minutes=minutes_ago))
    return live_servers


def test_the_chart_endpoints_answer_series_to_those_allowed(client, alice, carol, staff, sampled, acme):
    gpu = GPU.objects.order_by("pk").first()
    assert client.get(f"/history/gpus/{gpu.pk}.json").status_code == 302  # login first
    client.force_login(alice)
    body = client.get(f"/history/gpus/{gpu.pk}.json?range=1h").json()
    assert [s["label"] for s in body["series"]] == ["utilisation", "temperature", "memory used"]
    assert [p[1] for p in body["series"][0]["points"]] == [50, 50, 50] and body["range"] == "1h"
    assert len(client.get(f"/history/servers/{sampled[0].pk}.json").json()["series"]) == 8
    assert client.get("/history/cluster.json").json()["series"][1]["label"] == "GPUs in use"
    quota = client.get("/history/tenants/acme.json").json()["series"][1]
    assert quota["label"] == "GPU quota" and {p[1] for p in quota["points"]} == {8}
    assert client.get("/history/cluster.json?range=2y").status_code == 400
    client.force_login(carol)
    assert client.get("/history/tenants/acme.json").status_code == 404  # not her tenant
    client.force_login(staff)
    assert client.get("/history/tenants/acme.json").status_code == 200


def test_a_tasks_chart_covers_its_own_gpus_while_it_held_them(client, alice, sampled, acme):
    node = sampled[0]
    gpu = node.gpus.order_by("index").first()
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x", status="succeeded", node=node)
    Allocation.objects.create(task=task, gpu=gpu, node=node, memory_mb=1000,
                              allocated_at=timezone.now() - timedelta(minutes=35),
                              released_at=timezone.now() - timedelta(minutes=5))
    client.force_login(alice)
    series = client.get(f"/history/tasks/{task.pk}.json").json()["series"]
    assert [s["label"] for s in series] == ["gpu-01:0 utilisation", "gpu-01:0 memory used"]
    assert len(series[0]["points"]) == 2  # the samples 30 and 10 minutes ago, not the one before it started


def test_runscheduler_and_the_minute_sweep_both_sample(live_servers, acme):
    from scheduling.management.commands.runscheduler import Command
    from scheduling.sweep import sweep_task

    raw = GpuSample.objects.filter(resolution=HistoryResolution.RAW)
    Command().history_step()
    assert raw.count() == 16
    GpuSample.objects.all().delete()
    sweep_task()  # the django-q2 safety net keeps charts going without runscheduler
    assert raw.count() == 16
