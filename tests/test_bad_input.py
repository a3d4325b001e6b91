"""No input produces a 500: one test per family of bad input, each sent to the users'
API (single and batch submit), the portal's form, the query filters and the agent
API. Every one gets a 400 naming the field, and nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rest_framework.test import APIClient

from nodes.enrolment import issue_join_token
from nodes.models import Node
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task, TaskEvent, TaskLogChunk
from tests.conftest import free_port, subprocess_env, wait_for
from tests.test_agent_api import gpu_report

pytestmark = pytest.mark.django_db
API = "/api/v1"
AGENT = "/api/agent/v1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_api(api_client_for, alice, servers) -> APIClient:
    return api_client_for(alice)


@pytest.fixture
def web(client, alice, servers):
    client.force_login(alice)
    return client


@pytest.fixture
def agent(servers, acme) -> tuple[APIClient, Task]:
    node = servers[0]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {node.issue_token()}")
    task = Task.objects.create(tenant=acme, name="t", command="true", status=TaskStatus.ASSIGNED, node=node)
    Allocation.objects.create(task=task, gpu=node.gpus.get(index=0), node=node, memory_mb=1000)
    return client, task


def task(**fields) -> dict:
    return {"command": "python train.py", **fields}


def post_raw(client: APIClient, url: str, body: str):
    return client.generic("POST", url, body.encode("utf-8", "surrogatepass"), content_type="application/json")


class Written:
    """What a refused request must not have changed."""

    def __init__(self):
        self.before = self.now()

    @staticmethod
    def now():
        return (Task.objects.count(), TaskEvent.objects.count(), TaskLogChunk.objects.count(),
                Node.objects.count(), list(Task.objects.values_list("id", "status", "attempt").order_by("id")))

    def unchanged(self) -> bool:
        return self.now() == self.before


def refused(response, field: str | None = None) -> dict:
    assert response.status_code == 400, (response.status_code, response.content[:500])
    body = response.json() if response["Content-Type"].startswith("application/json") else {}
    if field is not None:
        assert field in json.dumps(body), body
    return body


def test_nul_bytes(user_api, web, agent):
    client, assigned = agent
    written = Written()
    refused(user_api.post(f"{API}/tasks", task(command="echo \x00"), format="json"), "command")
    refused(user_api.post(f"{API}/tasks", task(env={"A": "x\x00y"}), format="json"), "env")
    refused(user_api.post(f"{API}/tasks", task(**{"na\x00me": "x"}), format="json"))
    refused(user_api.post(f"{API}/tasks/batch", {"tasks": [task(), task(name="\x00")]}, format="json"), "tasks")
    refused(web.post("/submit/", {"command": "echo hi", "name": "a\x00b"}), None)
    refused(web.post("/tokens/", {"name": "ci\x00"}), None)
    refused(user_api.get(f"{API}/tasks", {"tenant": "acme\x00"}), "tenant")
    refused(user_api.get(f"{API}/gpus", {"server": "\x00"}), "server")
    refused(web.get("/tasks/", {"tenant": "\x00"}))
    refused(client.post(f"{AGENT}/tasks/{assigned.pk}/logs", {"chunks": [{"attempt": 0, "offset": 0,
                                                                          "data": "a\x00b"}]}, format="json"))
    refused(APIClient().post(f"{AGENT}/register", {"join_token": issue_join_token(), "name": "x",
                                                   "hostname": "h\x00"}, format="json"), "hostname")
    assert written.unchanged()


def test_lone_surrogates(user_api, agent):
    client, assigned = agent
    written = Written()
    refused(post_raw(user_api, f"{API}/tasks", '{"command": "echo \\ud800"}'), "command")
    refused(post_raw(user_api, f"{API}/tasks", '{"command": "x", "env": {"\\udfff": "v"}}'), "env")
    refused(post_raw(user_api, f"{API}/tasks/batch", '{"tasks": [{"command": "x", "name": "\\udc00"}]}'), "tasks")
    refused(post_raw(client, f"{AGENT}/tasks/{assigned.pk}/events",
                     '{"event": "finished", "attempt": 0, "reason": "\\ud83d"}'), "reason")
    assert written.unchanged()


def test_unicode_digits(user_api, web, agent):
    client, assigned = agent
    written = Written()
    fullwidth_sixty = "\uff16\uff10"
    for field, value in (("gpu_count", "²"), ("gpu_memory_mb", "١٢٠٠"), ("timeout_s", fullwidth_sixty),
                         ("gpu_count", "1_0")):
        refused(user_api.post(f"{API}/tasks", task(**{field: value}), format="json"), field)
    refused(user_api.post(f"{API}/tasks/batch", {"tasks": [task(gpu_count="²")]}, format="json"), "gpu_count")
    refused(web.post("/submit/", {"command": "echo hi", "gpu_count": "²"}))
    refused(web.post("/tokens/", {"name": "ci", "expires_days": "²"}))
    for param, value in (("offset", "²"), ("tail", "١٢"), ("attempt", "²")):
        refused(user_api.get(f"{API}/tasks/{assigned.pk}/logs", {param: value}), param)
    refused(client.post(f"{AGENT}/heartbeat", {"gpus": [gpu_report(0, "GPU-x", temperature_c="²")]}, format="json"))
    assert written.unchanged()


def test_deeply_nested_json(user_api, agent):
    client, _ = agent
    written = Written()
    deep_list = "[" * 100_000 + "]" * 100_000
    deep_env = '{"command": "x", "env": ' + '{"a": ' * 40 + '"v"' + "}" * 40 + "}"
    for body in (deep_list, deep_env):
        refused(post_raw(user_api, f"{API}/tasks", body))
        refused(post_raw(user_api, f"{API}/tasks/batch", body))
        refused(post_raw(client, f"{AGENT}/heartbeat", body))
    assert written.unchanged()


def test_integers_beyond_their_columns(user_api, agent):
    client, assigned = agent
    written = Written()
    for field, value in (("gpu_memory_mb", 10**30), ("timeout_s", 2**63), ("gpu_count", 2**31),
                         ("gpu_count", "9" * 5000)):
        refused(user_api.post(f"{API}/tasks", task(**{field: value}), format="json"), field)
    refused(post_raw(user_api, f"{API}/tasks", '{"command": "x", "gpu_count": ' + "9" * 5000 + "}"))
    refused(user_api.get(f"{API}/tasks/{assigned.pk}/logs", {"offset": 2**70}), "offset")
    assert user_api.get(f"{API}/tasks/{2**70}").status_code == 404
    refused(client.post(f"{AGENT}/tasks/{assigned.pk}/events", {"event": "started", "attempt": 2**40},
                        format="json"), "attempt")
    refused(client.post(f"{AGENT}/tasks/{assigned.pk}/logs", {"chunks": [{"attempt": 2**40, "offset": 2**64,
                                                                          "data": "x"}]}, format="json"), "chunks")
    assert client.post(f"{AGENT}/tasks/{2**70}/events", {"event": "started", "attempt": 0},
                       format="json").status_code == 404
    assert written.unchanged()


def test_wrong_json_types(user_api, agent):
    client, _ = agent
    written = Written()
    for field, value in (("name", ["a"]), ("priority", []), ("share_mode", 0), ("workload_class", {}),
                         ("env", ["A=1"]), ("tenant", ["acme"]), ("timeout_s", True), ("gpu_count", 1.5),
                         ("node_selector", [1]), ("working_dir", {"a": 1})):
        refused(user_api.post(f"{API}/tasks", task(**{field: value}), format="json"), field)
    refused(user_api.post(f"{API}/tasks", [task()], format="json"))
    refused(user_api.post(f"{API}/tasks", "just a string", format="json"))
    refused(user_api.post(f"{API}/tasks/batch", {"tasks": {"0": task()}}, format="json"), "tasks")
    refused(user_api.post(f"{API}/tasks/batch", [task()], format="json"))
    refused(client.post(f"{AGENT}/heartbeat", {"gpus": {"0": gpu_report(0, "GPU-x")}}, format="json"), "gpus")
    refused(client.post(f"{AGENT}/heartbeat", [], format="json"))
    refused(APIClient().post(f"{AGENT}/register", {"join_token": ["x"], "name": "n"}, format="json"), "join_token")
    assert written.unchanged()


def test_duplicate_keys(user_api, agent):
    client, assigned = agent
    written = Written()
    refused(post_raw(user_api, f"{API}/tasks", '{"command": "true", "command": "rm -rf ~"}'), "command")
    refused(post_raw(user_api, f"{API}/tasks", '{"command": "x", "env": {"A": "1", "A": "2"}}'), "env")
    refused(post_raw(user_api, f"{API}/tasks/batch", '{"tasks": [{"command": "x", "gpu_count": 1, '
                                                     '"gpu_count": 2}]}'), "tasks")
    refused(post_raw(client, f"{AGENT}/tasks/{assigned.pk}/events",
                     '{"event": "started", "event": "finished", "attempt": 0}'), "event")
    assert written.unchanged()


def test_env_names_with_a_trailing_newline_or_other_junk(user_api, web):
    written = Written()
    for name in ("PATH\n", "A B", "1X", "", "X=Y"):
        refused(user_api.post(f"{API}/tasks", task(env={name: "v"}), format="json"), "env")
    refused(user_api.post(f"{API}/tasks/batch", {"tasks": [task(env={"OK\n": "v"})]}, format="json"), "env")
    refused(web.post("/submit/", {"command": "echo hi", "env": "A B=1"}))
    assert written.unchanged()


def test_empty_or_oversized_label_keys_and_values(user_api, web):
    written = Written()
    for labels in ({"": "a"}, {"zone": ""}, {"k" * 64: "a"}, {"zone": "v" * 64}, {"-zone": "a"}):
        refused(user_api.post(f"{API}/tasks", task(node_selector=labels), format="json"), "node_selector")
        refused(user_api.post(f"{API}/tasks/batch", {"tasks": [task(node_selector=labels)]}, format="json"),
                "node_selector")
    refused(web.post("/submit/", {"command": "echo hi", "node_selector": "zone="}))
    assert written.unchanged()
    ok = user_api.post(f"{API}/tasks", task(node_selector={"zone": "a", "example.com/ib": "yes"}), format="json")
    assert ok.status_code == 201, ok.json()


def test_the_api_answers_503_json_while_the_database_is_down(tmp_path):
    dead = f"postgresql://portal@127.0.0.1:{free_port()}/portal"  # nothing listens there
    port = free_port()
    log = open(tmp_path / "daphne.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT, env=subprocess_env(DATABASE_URL=dead, PORTAL_REGISTRY="0", CHANNEL_LAYER="memory"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(f"{base}/api/v1/tasks", headers={"Authorization": "Token api_x_y"}, timeout=10)
            except httpx.TransportError:
                return None

        response = wait_for(up, 30, "daphne")
        assert response.status_code == 503, response.text[:300]
        assert response.headers["content-type"].startswith("application/json")
        assert "database" in response.json()["detail"] and response.headers["retry-after"]
        beat = httpx.post(f"{base}/api/agent/v1/heartbeat", json={"gpus": []},
                          headers={"Authorization": "Node node_x_y"}, timeout=10)
        assert beat.status_code == 503 and beat.json()["detail"]
        token = httpx.post(f"{base}/api/v1/tasks", json={"command": "x"}, headers={"Authorization": "Token api_x_y"},
                           timeout=10)
        assert token.status_code == 503 and token.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
