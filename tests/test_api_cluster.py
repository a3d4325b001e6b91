"""Read-only API: GPUs, servers, quota, cluster, health, and the OpenAPI schema."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from kernel import registry
from kernel.models import ControlPlaneServer
from nodes.models import NodeStatus
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task
from tenants.choices import Priority
from tests.conftest import make_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def as_alice(api_client_for, alice):
    return api_client_for(alice)


@pytest.fixture
def busy(acme, alice, servers):
    """One task holding GPU gpu-01:0, one GPU cordoned, a server draining, and some history."""
    task = Task.objects.create(tenant=acme, submitter=alice, name="run", command="x", status=TaskStatus.RUNNING,
                               node=servers[0])
    gpu0 = servers[0].gpus.get(index=0)
    Allocation.objects.create(task=task, gpu=gpu0, node=servers[0], memory_mb=40_000)
    # History: a finished task's released allocations hold nothing (gpu-01:2 stays free).
    done = Task.objects.create(tenant=acme, submitter=alice, name="done", command="x", status=TaskStatus.SUCCEEDED,
                               node=servers[0])
    for index in (0, 2):
        Allocation.objects.create(task=done, gpu=servers[0].gpus.get(index=index), node=servers[0], memory_mb=40_000,
                                  allocated_at=timezone.now() - timedelta(hours=2),
                                  released_at=timezone.now() - timedelta(hours=1))
    servers[0].gpus.get(index=1).cordon("ECC errors")
    make_server("gpu-03", gpus=2, status=NodeStatus.DRAINING)
    return task


def test_gpus_show_each_gpus_state(as_alice, busy):
    gpus = {f"{g['server']}:{g['index']}": g for g in as_alice.get("/api/v1/gpus").json()}
    assert len(gpus) == 18
    assert (gpus["gpu-01:0"]["state"], gpus["gpu-01:1"]["state"], gpus["gpu-01:2"]["state"]) == (
        "allocated", "cordoned", "free")
    assert gpus["gpu-03:0"]["state"] == "unavailable"
    free = as_alice.get("/api/v1/gpus?state=free&server=gpu-01").json()
    assert len(free) == 6


def test_gpus_refuse_an_unknown_state(as_alice, busy):
    assert "state" in as_alice.get("/api/v1/gpus?state=sleepy").json()


def test_servers_list_their_gpus_state_and_load(as_alice, busy):
    servers = {s["name"]: s for s in as_alice.get("/api/v1/servers").json()}
    assert servers["gpu-03"]["status"] == "draining"
    assert servers["gpu-01"]["load"]["allocated_gpus"] == 1 and len(servers["gpu-01"]["gpus"]) == 8
    assert [s["name"] for s in as_alice.get("/api/v1/servers?status=draining").json()] == ["gpu-03"]
    assert "status" in as_alice.get("/api/v1/servers?status=broken").json()


def test_quota_shows_limits_beside_live_usage(as_alice, busy):
    (acme,) = as_alice.get("/api/v1/quota").json()
    assert acme["tenant"] == "acme" and acme["role"] == "admin"
    assert acme["limits"]["max_gpus"] == 8 and acme["limits"]["max_priority"] == "HIGH"
    assert acme["usage"] == {"gpus": 1, "gpu_memory_mb": 40_000, "running_tasks": 1, "pending_tasks": 0}


def test_staff_see_every_tenants_quota(api_client_for, staff, acme, globex):
    assert [q["tenant"] for q in api_client_for(staff).get("/api/v1/quota").json()] == ["acme", "globex"]


def test_the_cluster_shows_control_plane_servers_gpu_totals_and_queue(as_alice, busy, acme, alice):
    registry.register("web")
    ControlPlaneServer.objects.create(name="old:1:scheduler", role="scheduler", hostname="old", pid=1,
                                      last_seen_at=timezone.now() - timedelta(seconds=120))
    Task.objects.create(tenant=acme, submitter=alice, name="p", command="x", priority=Priority.HIGH)
    body = as_alice.get("/api/v1/cluster").json()
    alive = {s["role"]: s["alive"] for s in body["servers"]}
    assert alive == {"web": True, "scheduler": False} and body["active_servers"] == 1
    assert body["gpus"]["total"] == 18 and body["gpus"]["allocated"] == 1 and body["gpus"]["cordoned"] == 1
    assert body["gpus"]["unavailable"] == 2
    assert body["queue"]["pending"] == 1 and body["queue"]["pending_by_priority"]["HIGH"] == 1
    assert body["queue"]["running"] == 1
    assert body["load"]["allocated_share"] == round(1 / 15, 3)


def test_health_needs_no_login_and_reports_a_missing_scheduler(client, db):
    body = client.get("/api/v1/health").json()
    assert (body["status"], body["database"], body["scheduler"]["seen_recently"]) == ("degraded", True, False)
    registry.register("scheduler")
    assert client.get("/api/v1/health").json()["status"] == "ok"


def test_the_openapi_schema_and_docs_are_served(client, alice):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/v1/tasks/{id}/cancel" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    # The interactive docs load Swagger UI from this server (the sidecar package), never a CDN.
    assert b"cdn.jsdelivr" not in docs.content and b"/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs.content


def test_health_counts_a_recent_scheduling_pass_as_a_live_scheduler(client, db):
    from scheduling.models import SchedulerLock

    SchedulerLock.objects.update_or_create(name="scheduler", defaults={"acquired_at": timezone.now()})
    assert client.get("/api/v1/health").json()["status"] == "ok"
    SchedulerLock.objects.filter(name="scheduler").update(acquired_at=timezone.now() - timedelta(minutes=5))
    assert client.get("/api/v1/health").json()["status"] == "degraded"


def test_the_openapi_schema_is_valid_and_warning_free(tmp_path):
    from django.core.management import call_command

    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert "/api/v1/tasks/batch" in out.read_text()
