"""In a real browser, history charts draw real samples: the admin GPU page (utilisation,
temperature, memory) and the portal dashboard (my tenant's GPUs in use against its quota)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from nodes.models import GPU, Node
from scheduling import history
from scheduling.models import Allocation, Task
from tests.agent_live import stop
from tests.test_live_end_to_end import CHROMIUM, CHROMIUM_ARGS, _daphne, static_root  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)"),
]

# Where a person wants the pictures (e.g. for a review); tmp_path otherwise.
SHOTS = os.environ.get("PORTAL_SCREENSHOTS")

CANVAS_INKED = """el => { const c = el.querySelector('canvas'); const d = c.getContext('2d')
    .getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


def _history(servers, acme, alice) -> GPU:
    """An hour of samples taken the way the scheduler takes them, with load that changes."""
    Node.objects.update(last_heartbeat_at=timezone.now())
    gpu = GPU.objects.get(node=servers[0], index=0)
    task = Task.objects.create(tenant=acme, submitter=alice, name="train", command="x", status="running",
                               node=servers[0])
    now = timezone.now()
    for i in range(12):
        at = now - timedelta(minutes=60 - 5 * i)
        GPU.objects.filter(pk=gpu.pk).update(utilization_pct=8 * i, memory_used_mb=2_000 + 5_000 * i,
                                             temperature_c=35 + 3 * i)
        if i == 4:
            for g in servers[0].gpus.order_by("index")[:4]:
                Allocation.objects.create(task=task, gpu=g, node=servers[0], memory_mb=40_000)
        Node.objects.update(last_heartbeat_at=at)
        history.record(at)
        history.roll_up(at)  # what the once-a-minute rollup would have done by then
    return gpu


def _shot(page, tmp_path: Path, name: str) -> None:
    target = Path(SHOTS) if SHOTS else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / name), full_page=True)


def test_charts_draw_real_history_on_the_admin_gpu_page_and_the_dashboard(
        tmp_path, static_root, servers, acme, alice):  # noqa: F811 (the imported fixture)
    from playwright.sync_api import sync_playwright

    gpu = _history(servers, acme, alice)
    get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    host, proc = _daphne(tmp_path, "charts", static_root=static_root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"http://{host}/admin/login/?next=/admin/nodes/gpu/{gpu.pk}/change/")
            page.fill("#id_username", "op")
            page.fill("#id_password", "pw-op-123456")
            page.click("input[type=submit]")
            page.wait_for_url(f"**/admin/nodes/gpu/{gpu.pk}/change/")
            chart = page.locator("[data-history]")
            page.wait_for_function("document.querySelector('[data-history]').hasAttribute('data-history-points')",
                                   timeout=20_000)
            data = page.evaluate("Chart.getChart(document.querySelector('[data-history] canvas')).data.datasets"
                                 ".map(d => [d.label, d.data.map(p => p.y)])")
            assert data[0][0] == "utilisation (%)" and data[0][1] == [8 * i for i in range(12)]
            assert data[2][0] == "memory used (MB)" and data[2][1][-1] == 57_000
            assert chart.evaluate(CANVAS_INKED) > 2_000  # lines were drawn, not just an empty canvas
            # A week reads the per-minute tier, in coarser steps: the same hour, averaged.
            page.click("[data-range='7d']")
            page.wait_for_function("document.querySelector('[data-history]').getAttribute('data-history-range')"
                                   " === '7d'", timeout=20_000)
            week = page.evaluate("Chart.getChart(document.querySelector('[data-history] canvas')).data.datasets[0]"
                                 ".data.map(p => p.y)")
            assert 2 <= len(week) < 12 and min(week) < 30 < max(week)
            page.click("[data-range='24h']")
            page.wait_for_function("document.querySelector('[data-history]').getAttribute('data-history-range')"
                                   " === '24h'", timeout=20_000)
            _shot(page, tmp_path, "admin-gpu-chart.png")

            portal = browser.new_page(viewport={"width": 1366, "height": 900})
            portal.goto(f"http://{host}/accounts/login/?next=/")
            portal.fill("#id_username", "alice")
            portal.fill("#id_password", "pw-alice")
            portal.click("button[type=submit]")
            portal.wait_for_url(f"http://{host}/")
            portal.wait_for_function("document.querySelector('[data-history]').hasAttribute('data-history-points')",
                                     timeout=20_000)
            used, quota = portal.evaluate("Chart.getChart(document.querySelector('[data-history] canvas')).data"
                                          ".datasets.map(d => d.data.map(p => p.y))")
            assert used == [0, 0, 0, 0] + [4] * 8 and set(quota) == {8}
            assert portal.locator("[data-history]").evaluate(CANVAS_INKED) > 1_000
            _shot(portal, tmp_path, "dashboard-chart.png")
            browser.close()
    finally:
        stop(proc)
