"""The agent API: enrolment, node-token auth, heartbeats, task reports and logs."""

from __future__ import annotations

import pytest
from django.db.models.functions import Now
from rest_framework.test import APIClient

from kernel.models import Alert
from nodes.enrolment import issue_join_token
from nodes.models import GPU, JoinToken, Node, NodeStatus
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task, TaskLogChunk
from tests.conftest import make_server

API = "/api/agent/v1"


def gpu_report(index: int, uuid: str, **extra) -> dict:
    return {"index": index, "uuid": uuid, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81_559,
            "memory_used_mb": 1_000 + index, "utilization_pct": 40, "temperature_c": 50, "power_w": 300,
            "ecc_errors": 0, "retired_pages": 0, **extra}


def agent_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {token}")
    return client


@pytest.fixture
def enrolled(db) -> tuple[Node, str]:
    secret = issue_join_token()
    response = APIClient().post(f"{API}/register", {"join_token": secret, "name": "sim-01", "hostname": "h1"},
                                format="json")
    assert response.status_code == 201, response.json()
    return Node.objects.get(name="sim-01"), response.json()["node_token"]


def test_a_cluster_join_token_registers_a_server_that_a_heartbeat_brings_online(enrolled):
    node, token = enrolled
    assert node.status == NodeStatus.OFFLINE and not node.gpus.exists()
    assert node.token_prefix and token not in (node.token_digest, node.token_prefix)
    response = agent_client(token).post(f"{API}/heartbeat", {
        "name": "sim-01", "agent_version": "0.1.0",
        "gpus": [gpu_report(i, f"GPU-sim-01-{i}") for i in range(8)]}, format="json")
    assert response.status_code == 200, response.json()
    node.refresh_from_db()
    assert node.status == NodeStatus.ACTIVE and node.last_heartbeat_at is not None
    assert node.agent_version == "0.1.0"
    assert sorted(node.gpus.values_list("memory_used_mb", flat=True)) == [1000 + i for i in range(8)]

    # A second heartbeat updates the same rows in place.
    agent_client(token).post(f"{API}/heartbeat", {
        "gpus": [gpu_report(i, f"GPU-sim-01-{i}", memory_used_mb=5_000) for i in range(8)]}, format="json")
    assert node.gpus.count() == 8
    assert set(node.gpus.values_list("memory_used_mb", flat=True)) == {5_000}


def test_a_server_join_token_works_once(servers):
    secret = issue_join_token(servers[0])
    first = APIClient().post(f"{API}/register", {"join_token": secret, "name": "whatever"}, format="json")
    assert first.status_code == 201 and first.json()["name"] == "gpu-01"
    again = APIClient().post(f"{API}/register", {"join_token": secret, "name": "whatever"}, format="json")
    assert again.status_code == 403 and "join_token" in again.json()
    assert JoinToken.objects.get().used_at is not None


def test_an_unknown_node_token_is_refused(enrolled):
    response = agent_client("node_not-a-real-token").post(f"{API}/heartbeat", {"gpus": []}, format="json")
    assert response.status_code == 401
    assert APIClient().post(f"{API}/heartbeat", {"gpus": []}, format="json").status_code in (401, 403)


def test_a_node_token_cannot_heartbeat_for_another_server(enrolled, servers):
    node, token = enrolled
    other = servers[1]
    before = list(GPU.objects.filter(node=other).values_list("uuid", "memory_used_mb", "updated_at"))
    by_name = agent_client(token).post(f"{API}/heartbeat", {
        "name": other.name, "gpus": [gpu_report(0, "GPU-new-0")]}, format="json")
    assert by_name.status_code == 400 and "name" in by_name.json()
    by_uuid = agent_client(token).post(f"{API}/heartbeat", {
        "gpus": [gpu_report(i, f"GPU-gpu-02-{i}") for i in range(2)]}, format="json")
    assert by_uuid.status_code == 400 and "gpus[0].uuid" in by_uuid.json()
    assert list(GPU.objects.filter(node=other).values_list("uuid", "memory_used_mb", "updated_at")) == before
    node.refresh_from_db()
    assert node.last_heartbeat_at is None and not node.gpus.exists()


def test_a_garbage_heartbeat_gets_field_messages_and_changes_nothing(enrolled):
    node, token = enrolled
    client = agent_client(token)
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(i, f"GPU-s-{i}") for i in range(2)]}, format="json")
    node.refresh_from_db()
    before = (node.last_heartbeat_at, list(node.gpus.values_list("uuid", "memory_used_mb", "utilization_pct")))

    for payload, field in [
        ({"gpus": [gpu_report(0, "GPU-s-0", utilization_pct=250)]}, "gpus"),
        ({"gpus": [gpu_report(0, "GPU-s-0"), gpu_report(0, "GPU-s-1")]}, "gpus"),
        ({"gpus": "eight"}, "gpus"),
        ({}, "gpus"),
    ]:
        response = client.post(f"{API}/heartbeat", payload, format="json")
        assert response.status_code == 400 and field in response.json(), response.json()
    response = client.post(f"{API}/heartbeat", "{not json", content_type="application/json")
    assert response.status_code == 400
    node.refresh_from_db()
    assert (node.last_heartbeat_at, list(node.gpus.values_list("uuid", "memory_used_mb", "utilization_pct"))) \
        == before


def test_a_gpu_reporting_ecc_or_xid_errors_is_cordoned_with_an_alert(enrolled):
    node, token = enrolled
    client = agent_client(token)
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(i, f"GPU-s-{i}") for i in range(3)]}, format="json")
    response = client.post(f"{API}/heartbeat", {"gpus": [
        gpu_report(0, "GPU-s-0"), gpu_report(1, "GPU-s-1", ecc_errors=3, retired_pages=2),
        gpu_report(2, "GPU-s-2", xid_errors=[79])]}, format="json")
    assert response.status_code == 200 and response.json()["cordoned"] == ["1", "2"]
    gpus = {g.index: g for g in node.gpus.all()}
    assert not gpus[0].cordoned
    assert gpus[1].cordoned and "3 uncorrected ECC" in gpus[1].cordon_reason and gpus[1].health == "error"
    assert gpus[2].cordoned and "Xid" in gpus[2].cordon_reason
    assert Alert.objects.filter(kind=Alert.Kind.GPU_ERROR, node=node).count() == 2
    # The same count again is not a new error: no second alert.
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0"), gpu_report(1, "GPU-s-1", ecc_errors=3),
                                              gpu_report(2, "GPU-s-2")]}, format="json")
    assert Alert.objects.filter(kind=Alert.Kind.GPU_ERROR, node=node).count() == 2


def test_a_gpu_that_joins_with_lifetime_ecc_errors_is_not_cordoned_until_the_count_rises(enrolled):
    """NVML's count is the card's lifetime one: errors it had before it joined are history."""
    node, token = enrolled
    client = agent_client(token)
    response = client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=2)]}, format="json")
    assert response.status_code == 200 and response.json()["cordoned"] == []
    gpu = node.gpus.get()
    assert (gpu.cordoned, gpu.health, gpu.ecc_errors) == (False, "ok", 2)
    assert not Alert.objects.filter(kind=Alert.Kind.GPU_ERROR, node=node).exists()

    response = client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=3)]}, format="json")
    assert response.json()["cordoned"] == ["0"]
    gpu.refresh_from_db()
    assert gpu.cordoned and "3 uncorrected ECC error(s) (was 2)" in gpu.cordon_reason and gpu.health == "error"


def test_an_error_stays_through_heartbeats_until_uncordon_puts_the_gpu_back_in_service(enrolled):
    from nodes.gpu_state import GPUState, gpu_state

    node, token = enrolled
    client = agent_client(token)
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0")]}, format="json")
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=1)]}, format="json")
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=1)]}, format="json")
    gpu = node.gpus.get()
    assert (gpu.cordoned, gpu.health) == (True, "error")  # no new error, but the old one is not forgotten

    gpu.uncordon()
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=1)]}, format="json")
    gpu.refresh_from_db()
    node.refresh_from_db()
    assert (gpu.cordoned, gpu.cordon_reason, gpu.health) == (False, "", "ok")
    assert gpu_state(gpu, node, allocated=False) == GPUState.FREE


def test_a_heartbeat_that_read_the_gpu_before_an_uncordon_does_not_bring_its_error_back(enrolled):
    """The report's write reads the row's health as it is when it writes, not as it was read."""
    from nodes import heartbeat

    node, token = enrolled
    client = agent_client(token)
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0")]}, format="json")
    client.post(f"{API}/heartbeat", {"gpus": [gpu_report(0, "GPU-s-0", ecc_errors=1)]}, format="json")
    stale = heartbeat._known_gpus(node.pk)  # the heartbeat's read: health "error"
    assert stale[0].health == "error"
    node.gpus.get().uncordon()  # the operator, between that read and the write

    to_update, _, errored = heartbeat._apply_reports(node, stale, [gpu_report(0, "GPU-s-0", ecc_errors=1)])
    assert not errored
    heartbeat._touch_and_update_metrics(node, {}, to_update)
    assert node.gpus.get().health == "ok"


def test_heartbeat_time_is_the_portal_clock(enrolled):
    node, token = enrolled
    agent_client(token).post(f"{API}/heartbeat", {"gpus": []}, format="json")
    assert Node.objects.filter(pk=node.pk, last_heartbeat_at__lte=Now()).exists()


@pytest.fixture
def assigned_task(enrolled, acme):
    node, token = enrolled
    agent_client(token).post(f"{API}/heartbeat", {"gpus": [gpu_report(i, f"GPU-s-{i}") for i in range(2)]},
                             format="json")
    task = Task.objects.create(tenant=acme, name="t", command="true", status=TaskStatus.ASSIGNED, node=node)
    Allocation.objects.create(task=task, gpu=node.gpus.get(index=1), node=node, memory_mb=1000)
    return task


def test_assignments_list_the_servers_tasks_with_their_gpus(assigned_task, enrolled):
    _, token = enrolled
    state = agent_client(token).get(f"{API}/assignments").json()
    assert [(t["id"], t["gpu_indices"], t["tenant"]) for t in state["tasks"]] == [(assigned_task.pk, [1], "acme")]
    # Known etag and no wait: the same answer at once.
    again = agent_client(token).get(f"{API}/assignments", {"known": state["etag"], "wait": "0"}).json()
    assert again["etag"] == state["etag"]
    assert agent_client(token).get(f"{API}/assignments", {"wait": "99"}).status_code == 400


def test_task_reports_are_idempotent_and_only_from_the_tasks_server(assigned_task, enrolled, servers):
    _, token = enrolled
    client = agent_client(token)
    url = f"{API}/tasks/{assigned_task.pk}/events"
    for _ in range(2):
        assert client.post(url, {"event": "started", "attempt": 0}, format="json").status_code == 200
    assert assigned_task.events.filter(to_status="running").count() == 1

    intruder = agent_client(servers[0].issue_token())
    refused = intruder.post(url, {"event": "finished", "attempt": 0, "exit_code": 0}, format="json")
    assert refused.status_code == 409
    assert client.post(url, {"event": "finished", "attempt": 7, "exit_code": 0}, format="json").json()["status"] \
        == "running"
    assert client.post(url, {"event": "exploded", "attempt": 0}, format="json").status_code == 400
    for _ in range(2):
        done = client.post(url, {"event": "finished", "attempt": 0, "exit_code": 3}, format="json")
        assert done.json()["status"] == "failed"
    assigned_task.refresh_from_db()
    assert (assigned_task.exit_code, assigned_task.failure_reason) == (3, "exit code 3")
    assert not Allocation.objects.filter(task=assigned_task, released_at__isnull=True).exists()


def test_log_chunks_are_stored_once_per_offset(assigned_task, enrolled, servers):
    _, token = enrolled
    url = f"{API}/tasks/{assigned_task.pk}/logs"
    chunks = {"chunks": [{"attempt": 0, "offset": 0, "data": "hello\n"}, {"attempt": 0, "offset": 6, "data": "x\n"}]}
    for _ in range(2):
        assert agent_client(token).post(url, chunks, format="json").status_code == 200
    assert list(TaskLogChunk.objects.values_list("offset", "data")) == [(0, "hello\n"), (6, "x\n")]
    # Resent from offset 0 with more text (the agent crashed before noting what it sent):
    # the answer says where the stored chunk ends, so the agent resends only the rest.
    again = agent_client(token).post(url, {"chunks": [{"attempt": 0, "offset": 6, "data": "x\ny\n"}]},
                                     format="json")
    assert again.json()["ends"] == {"0:6": 8}
    bad = agent_client(token).post(url, {"chunks": [{"attempt": 0, "offset": -1, "data": "x"}]}, format="json")
    assert bad.status_code == 400 and "chunks" in bad.json()
    other = agent_client(make_server("gpu-09").issue_token()).post(url, chunks, format="json")
    assert other.status_code == 409
    assert TaskLogChunk.objects.count() == 2


def test_a_task_the_agent_lost_goes_back_to_pending_and_an_oom_raises_an_alert(assigned_task, enrolled):
    _, token = enrolled
    client = agent_client(token)
    url = f"{API}/tasks/{assigned_task.pk}/events"
    client.post(url, {"event": "started", "attempt": 0}, format="json")
    lost = client.post(url, {"event": "finished", "attempt": 0, "lost": True, "reason": "agent restarted"},
                       format="json")
    assert lost.json() == {"id": assigned_task.pk, "status": "pending", "attempt": 1}
    assert assigned_task.events.filter(reason="agent restarted").exists()

    Task.objects.filter(pk=assigned_task.pk).update(status=TaskStatus.RUNNING, node=enrolled[0])
    oom = {"event": "finished", "attempt": 1, "exit_code": 1, "oom": True}
    assert client.post(url, oom, format="json").json() == {"id": assigned_task.pk, "status": "pending", "attempt": 2}
    assert client.post(url, oom, format="json").status_code == 409  # requeued: no longer on this server
    assert Alert.objects.filter(kind=Alert.Kind.TASK_OOM, task=assigned_task).count() == 1
