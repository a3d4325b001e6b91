"""The GPU inventory is the agent's, checked: a GPU that stops being reported is
never given to a task, a UUID that changes at an index is flagged, and values
outside physical bounds are refused with an alert and never stored."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from kernel.models import Alert
from nodes.enrolment import issue_join_token
from nodes.models import GPU, Node
from scheduling.models import Task
from scheduling.passes import run_pass

API = "/api/agent/v1"
pytestmark = pytest.mark.django_db


def gpu(index: int, uuid: str | None = None, **extra) -> dict:
    return {"index": index, "uuid": uuid or f"GPU-sim-{index}", "name": "NVIDIA H100 80GB HBM3",
            "memory_total_mb": 81_559, "memory_used_mb": 0, "utilization_pct": 0, "temperature_c": 40,
            "power_w": 100, **extra}


@pytest.fixture
def agent() -> tuple[Node, APIClient]:
    response = APIClient().post(f"{API}/register", {"join_token": issue_join_token(), "name": "sim-01"},
                                format="json")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {response.json()['node_token']}")
    assert client.post(f"{API}/heartbeat", {"gpus": [gpu(0), gpu(1)]}, format="json").status_code == 200
    return Node.objects.get(name="sim-01"), client


def test_a_gpu_that_stops_being_reported_is_cordoned_with_an_alert_and_never_given_to_a_task(agent, acme):
    node, client = agent
    response = client.post(f"{API}/heartbeat", {"gpus": [gpu(0)]}, format="json")
    assert response.status_code == 200 and response.json()["cordoned"] == ["1"]
    vanished = GPU.objects.get(node=node, index=1)
    assert vanished.cordoned and "no longer reported" in vanished.cordon_reason
    alert = Alert.objects.get(kind=Alert.Kind.GPU_ERROR, gpu=vanished)
    assert "no longer reported" in alert.message
    client.post(f"{API}/heartbeat", {"gpus": [gpu(0)]}, format="json")
    assert Alert.objects.filter(gpu=vanished).count() == 1  # not one per heartbeat

    tasks = [Task.objects.create(tenant=acme, name=f"t{i}", command="true", gpu_count=1, workload_class="online")
             for i in range(2)]
    run_pass()
    tasks = list(Task.objects.filter(pk__in=[t.pk for t in tasks]).order_by("pk"))
    placed = [t for t in tasks if t.status == "assigned"]
    assert len(placed) == 1, [t.pending_reason for t in tasks]
    assert list(placed[0].allocations.values_list("gpu__index", flat=True)) == [0]


def test_a_changed_uuid_at_an_index_is_flagged_not_silently_accepted(agent):
    node, client = agent
    response = client.post(f"{API}/heartbeat", {"gpus": [gpu(0), gpu(1, "GPU-swapped-in")]}, format="json")
    assert response.status_code == 200 and response.json()["cordoned"] == ["1"]
    changed = GPU.objects.get(node=node, index=1)
    assert changed.cordoned and "GPU-sim-1" in changed.cordon_reason and "GPU-swapped-in" in changed.cordon_reason
    assert Alert.objects.filter(kind=Alert.Kind.GPU_ERROR, gpu=changed, message__contains="UUID changed").exists()
    assert not GPU.objects.get(node=node, index=0).cordoned


@pytest.mark.parametrize("field, value", [
    ("memory_used_mb", 81_560),  # more than the GPU has
    ("temperature_c", 400),
    ("temperature_c", -5),
    ("power_w", 10**6),
    ("utilization_pct", 101),
    ("ecc_errors", 2**63),  # beyond the bigint column
    ("retired_pages", 2**31),
    ("xid_errors", [2**40]),
    ("processes", [{"pid": 2**40}]),
    ("processes", [{"pid": 1, "used_memory_mb": 90_000}]),
])
def test_a_report_outside_physical_bounds_is_refused_with_an_alert_and_never_stored(agent, field, value):
    node, client = agent
    before = list(GPU.objects.filter(node=node).order_by("index").values())
    heard = Node.objects.get(pk=node.pk).last_heartbeat_at
    response = client.post(f"{API}/heartbeat", {"gpus": [gpu(0), gpu(1, **{field: value})]}, format="json")
    assert response.status_code == 400
    assert field in str(response.json())
    assert list(GPU.objects.filter(node=node).order_by("index").values()) == before
    assert Node.objects.get(pk=node.pk).last_heartbeat_at == heard
    assert Alert.objects.filter(node=node, message__contains="heartbeat of sim-01 refused").count() == 1
