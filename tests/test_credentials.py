"""Credentials are single-purpose: a cluster join token enrols new servers only, an
existing server is taken over only with an operator's approval, and a node token
reaches only its own server's tasks."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from nodes.enrolment import issue_join_token
from nodes.models import Node
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task, TaskEvent, TaskLogChunk
from tests.conftest import make_server

API = "/api/agent/v1"


def register(secret: str, name: str):
    return APIClient().post(f"{API}/register", {"join_token": secret, "name": name}, format="json")


def heartbeat(token: str):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {token}")
    return client.post(f"{API}/heartbeat", {"gpus": []}, format="json")


@pytest.mark.django_db
def test_a_cluster_join_token_cannot_take_over_an_enrolled_server_by_name():
    cluster = issue_join_token(note="cluster")
    first = register(cluster, "gpu-01")
    assert first.status_code == 201
    token = first.json()["node_token"]
    before = Node.objects.values("token_prefix", "token_digest").get(name="gpu-01")

    hijack = register(cluster, "gpu-01")
    assert hijack.status_code == 403
    assert "already enrolled" in hijack.json()["join_token"][0]
    assert Node.objects.values("token_prefix", "token_digest").get(name="gpu-01") == before
    assert heartbeat(token).status_code == 200  # the real agent is untouched
    assert register(cluster, "gpu-02").status_code == 201  # new servers still join


@pytest.mark.django_db
def test_an_operator_lets_a_server_enrol_again_once_from_the_admin(client, staff):
    cluster = issue_join_token(note="cluster")
    old_token = register(cluster, "gpu-01").json()["node_token"]
    node = Node.objects.get(name="gpu-01")
    client.force_login(staff)
    response = client.post("/admin/nodes/node/", {"action": "allow_reenrolment", "_selected_action": [node.pk]})
    assert response.status_code == 302
    assert heartbeat(old_token).status_code == 401  # revoked at once

    again = register(cluster, "gpu-01")
    assert again.status_code == 201 and again.json()["node_id"] == node.pk
    assert heartbeat(again.json()["node_token"]).status_code == 200
    assert register(cluster, "gpu-01").status_code == 403  # the approval is used up


@pytest.mark.django_db
def test_a_one_time_token_made_for_a_server_re_enrols_it_once():
    node = make_server("gpu-01")
    node.issue_token()
    secret = issue_join_token(node)
    assert register(secret, "anything").json()["name"] == "gpu-01"
    assert register(secret, "anything").status_code == 403


@pytest.mark.django_db
def test_assignments_carry_only_what_the_agent_needs_and_only_its_own_tasks(acme, alice):
    mine, other = make_server("gpu-01"), make_server("gpu-02")
    token = mine.issue_token()
    tasks = []
    for node in (mine, other):
        task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="true", env={"K": "v"},
                                   status=TaskStatus.ASSIGNED, node=node)
        Allocation.objects.create(task=task, gpu=node.gpus.get(index=0), node=node, memory_mb=1000)
        tasks.append(task)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {token}")
    state = client.get(f"{API}/assignments").json()
    assert [t["id"] for t in state["tasks"]] == [tasks[0].pk]
    assert set(state["tasks"][0]) == {"id", "attempt", "name", "status", "command", "env", "working_dir",
                                      "timeout_s", "tenant", "user", "gpu_indices"}
    assert state["tasks"][0]["user"] == "alice"

    # Nothing of the other server's task can be written with this token.
    url = f"{API}/tasks/{tasks[1].pk}"
    assert client.post(f"{url}/events", {"event": "started", "attempt": 0}, format="json").status_code == 409
    logs = client.post(f"{url}/logs", {"chunks": [{"attempt": 0, "offset": 0, "data": "forged"}]}, format="json")
    assert logs.status_code == 409
    assert not TaskLogChunk.objects.exists() and not TaskEvent.objects.filter(task=tasks[1]).exists()
