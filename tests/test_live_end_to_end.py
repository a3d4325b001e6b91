"""Live updates across real processes: a heartbeat posted to one daphne process
reaches a websocket held by another one (Postgres layer; Redis with REDIS_URL),
and an operator's browser shows a new GPU value without a reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from websockets.sync.client import connect

from nodes.models import GPU
from tests.agent_live import stop, wait_for_port
from tests.conftest import free_port, make_server, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.django_db(transaction=True)


def _daphne(tmp: Path, name: str, *, redis: bool = False, static_root: Path | None = None):
    port = free_port()
    env = subprocess_env(PORTAL_PROCESS_NAME=f"test-{name}", LIVE_MIN_INTERVAL_MS="100")
    if not redis:
        env.pop("REDIS_URL", None)
    if static_root is not None:
        env.update(SERVE_STATIC="true", STATIC_ROOT=str(static_root))
    log = open(tmp / f"daphne-{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_for_port(port)
    return f"127.0.0.1:{port}", proc


@pytest.fixture
def operator_session(db) -> str:
    user = get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def server():
    node = make_server("live-01", gpus=2, memory_mb=81_559)
    return node, node.issue_token()


def _heartbeat(host: str, node, token: str, utilization: list[int]) -> None:
    """What an agent posts (the GPU list is read once: no ORM inside playwright's event loop)."""
    if not hasattr(node, "_gpu_list"):
        node._gpu_list = list(node.gpus.order_by("index"))
    gpus = [{"index": g.index, "uuid": g.uuid, "name": g.model_name, "memory_total_mb": g.memory_total_mb,
             "memory_used_mb": 1000 * (i + 1), "utilization_pct": u, "temperature_c": 50 + i, "power_w": 300}
            for i, (g, u) in enumerate(zip(node._gpu_list, utilization, strict=True))]
    response = httpx.post(f"http://{host}/api/agent/v1/heartbeat", json={"gpus": gpus},
                          headers={"Authorization": f"Node {token}"}, timeout=10)
    assert response.status_code == 200, response.text


def _portal_samples(text: str) -> dict:
    """The portal's own samples (not per-process ones, nor ones that move with the clock)."""
    from prometheus_client.parser import text_string_to_metric_families

    moving = ("scrape_seconds", "heartbeat_age", "oldest_wait")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            if f.name.startswith(("gpu_", "scheduler_", "tenant_", "node_up", "portal_alerts"))
            for s in f.samples if not any(m in s.name for m in moving)}


def _layers() -> list:
    redis = pytest.param("redis", marks=pytest.mark.skipif(
        not os.environ.get("REDIS_URL"), reason="REDIS_URL not set (CI sets it; e.g. redis://127.0.0.1:6379/0)"))
    return ["postgres", redis]


@pytest.mark.parametrize("layer", _layers())
def test_a_heartbeat_posted_to_one_web_process_reaches_a_viewer_on_another(layer, tmp_path, operator_session,
                                                                           server):
    node, token = server
    a, proc_a = _daphne(tmp_path, "a", redis=layer == "redis")
    b, proc_b = _daphne(tmp_path, "b", redis=layer == "redis")
    try:
        headers = {"Cookie": f"sessionid={operator_session}", "Origin": f"http://{b}"}
        with connect(f"ws://{b}/ws/cluster/", additional_headers=headers, open_timeout=20) as ws:
            first = json.loads(ws.recv(timeout=20))
            assert first["type"] == "gpus" and first["full"]
            gpu0 = node.gpus.get(index=0)
            _heartbeat(a, node, token, [64, 5])  # to process A

            deadline = time.monotonic() + 20
            while True:
                frame = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
                row = next((g for g in frame.get("gpus", []) if g["id"] == gpu0.pk), None)
                if row and row["utilization_pct"] == 64:
                    break
            assert row["memory_used_mb"] == 1000 and row["node_status"] == "active"

        # Both web processes report the same database-derived metrics.
        scrapes = [_portal_samples(httpx.get(f"http://{host}/metrics", timeout=10).text) for host in (a, b)]
        assert scrapes[0] == scrapes[1]
        assert scrapes[0][("gpu_utilization_percent", (("gpu", "0"), ("model", gpu0.model_name),
                                                       ("node", "live-01"), ("uuid", gpu0.uuid)))] == 64
    finally:
        stop(proc_a)
        stop(proc_b)


def test_a_foreign_or_anonymous_websocket_is_refused_by_a_real_server(tmp_path, acme, alice):
    host, proc = _daphne(tmp_path, "auth")
    client = Client()
    client.force_login(alice)
    alice_session = client.cookies["sessionid"].value
    try:
        refused = [("/ws/cluster/", ""), ("/ws/cluster/", alice_session), ("/ws/tasks/globex/", alice_session)]
        for path, cookie in refused:
            headers = {"Origin": f"http://{host}", **({"Cookie": f"sessionid={cookie}"} if cookie else {})}
            with pytest.raises(Exception, match="403"):
                connect(f"ws://{host}{path}", additional_headers=headers, open_timeout=20).close()
        headers = {"Origin": f"http://{host}", "Cookie": f"sessionid={alice_session}"}
        with connect(f"ws://{host}/ws/tasks/acme/", additional_headers=headers, open_timeout=20):
            pass
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def static_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("static")
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True,
                   env={**os.environ, "STATIC_ROOT": str(root)}, timeout=120)
    return root


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)")
def test_an_operator_sees_a_gpu_change_on_the_admin_pages_without_a_reload(tmp_path, static_root, server):
    from playwright.sync_api import sync_playwright

    node, token = server
    get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    host, proc = _daphne(tmp_path, "browser", static_root=static_root)
    try:
        _heartbeat(host, node, token, [10, 20])
        gpu0 = GPU.objects.get(node=node, index=0)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(f"http://{host}/admin/login/?next=/admin/nodes/gpu/")
            page.fill("#id_username", "op")
            page.fill("#id_password", "pw-op-123456")
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/nodes/gpu/")
            cell = page.locator(f'[data-gpu="{gpu0.pk}"][data-field="utilization_pct"]')
            assert cell.inner_text() == "10"
            page.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'", timeout=20_000)

            _heartbeat(host, node, token, [97, 20])  # through the agent API, as an agent would
            page.wait_for_function(
                f"document.querySelector('[data-gpu=\"{gpu0.pk}\"][data-field=\"utilization_pct\"]')"
                ".textContent === '97'", timeout=20_000)
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload
            label = page.locator(f'[data-gpu="{gpu0.pk}"][data-field="memory"] .membar-label').inner_text()
            assert label.startswith("1000 MB /")

            # The cluster overview grid redraws live as well.
            page.goto(f"http://{host}/admin/cluster/")
            page.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'", timeout=20_000)
            _heartbeat(host, node, token, [41, 20])
            page.wait_for_function(
                f"(document.querySelector('[data-gpu-cell=\"{gpu0.pk}\"] span') || {{}}).textContent === '41%'",
                timeout=20_000)
            browser.close()
    finally:
        stop(proc)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)")
def test_a_portal_user_sees_their_task_and_quota_change_without_a_reload(tmp_path, static_root, acme, alice):
    from playwright.sync_api import sync_playwright

    from scheduling.models import Task

    task = Task.objects.create(tenant=acme, submitter=alice, name="watch-me", command="sleep 1000")
    host, proc = _daphne(tmp_path, "portal", static_root=static_root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"http://{host}/accounts/login/?next=/tasks/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice")
            page.click("button[type=submit]")
            page.wait_for_url("**/tasks/")
            status = page.locator(f'[data-task="{task.pk}"][data-field="status"]')
            assert status.inner_text() == "pending"
            page.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'", timeout=20_000)

            dashboard = context.new_page()
            dashboard.goto(f"http://{host}/")
            dashboard.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'",
                                        timeout=20_000)
            assert "Pending tasks: 1 / " in dashboard.inner_text("body")

            detail = context.new_page()
            detail.goto(f"http://{host}/tasks/{task.pk}/")
            detail.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'", timeout=20_000)

            # In another tab the user cancels it; the list, the dashboard and the detail page follow.
            other = context.new_page()
            other.goto(f"http://{host}/tasks/{task.pk}/")
            other.click("button.danger")
            page.wait_for_function(
                f"document.querySelector('[data-task=\"{task.pk}\"][data-field=\"status\"]').textContent"
                " === 'cancelled'", timeout=20_000)
            dashboard.wait_for_function("document.body.innerText.includes('Pending tasks: 0 / ')", timeout=20_000)
            detail.wait_for_function("document.getElementById('task-events').innerText.includes('cancelled')",
                                     timeout=20_000)
            assert detail.evaluate("performance.getEntriesByType('navigation').length") == 1
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
            browser.close()
    finally:
        stop(proc)
