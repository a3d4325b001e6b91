"""In a real browser: a Chinese browser gets Chinese pages, and the switch on every page
changes the language of the portal and of the admin."""

from __future__ import annotations

import os

import pytest
from django.contrib.auth import get_user_model

from tests.agent_live import stop
from tests.test_live_end_to_end import CHROMIUM, CHROMIUM_ARGS, _daphne, static_root  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)"),
]
SHOTS = os.environ.get("PORTAL_SCREENSHOTS")


def _an_hour_of_history(servers, acme, alice) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from nodes.models import Node
    from scheduling import history
    from scheduling.models import Allocation, Task

    task = Task.objects.create(tenant=acme, submitter=alice, name="训练", command="x", status="running",
                               node=servers[0], gpu_count=2)
    now = timezone.now()
    for i in range(12):
        if i == 6:
            for gpu in servers[0].gpus.order_by("index")[:2]:
                Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=40_000)
        Node.objects.update(last_heartbeat_at=now - timedelta(minutes=60 - 5 * i))
        history.sample(now - timedelta(minutes=60 - 5 * i))


def test_the_language_switch_shows_chinese_on_the_portal_and_the_admin(
        tmp_path, static_root, servers, acme, alice):  # noqa: F811 (the imported fixture)
    from playwright.sync_api import sync_playwright

    get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    _an_hour_of_history(servers, acme, alice)
    host, proc = _daphne(tmp_path, "lang", static_root=static_root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            # A browser set to Chinese gets Chinese from the first page on.
            chinese = browser.new_context(locale="zh-CN", viewport={"width": 1366, "height": 900})
            page = chinese.new_page()
            page.goto(f"http://{host}/accounts/login/")
            assert page.locator("button[type=submit]").inner_text() == "登录"
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice")
            page.click("button[type=submit]")
            page.wait_for_url(f"http://{host}/")
            assert page.locator("h1").inner_text() == "概览"
            assert "我的运行中和排队任务" in page.inner_text("body")
            page.wait_for_function("document.querySelector('[data-history]').hasAttribute('data-history-points')",
                                   timeout=20_000)
            legend = page.evaluate("Chart.getChart(document.querySelector('[data-history] canvas')).data.datasets"
                                   ".map(d => d.label)")
            assert legend == ["在用 GPU (GPU)", "GPU 配额 (GPU)"]
            if SHOTS:
                page.screenshot(path=os.path.join(SHOTS, "dashboard-zh-hans.png"), full_page=True)

            # An English browser, switched to Chinese on the portal, then on the admin, and back.
            english = browser.new_context(locale="en-US")
            page = english.new_page()
            page.goto(f"http://{host}/admin/login/?next=/admin/")
            page.fill("#id_username", "op")
            page.fill("#id_password", "pw-op-123456")
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/")
            assert "Cluster overview" in page.inner_text("#content")
            page.select_option("#header .lang-switch select", "zh-hans")
            page.wait_for_function("document.documentElement.lang === 'zh-hans'")
            assert "集群总览" in page.inner_text("#content") and "GPU 服务器" in page.inner_text("#content")
            page.goto(f"http://{host}/tasks/")
            assert page.locator("h1").inner_text() == "任务"  # the choice is remembered across the site
            page.select_option(".lang-switch select", "en")
            page.wait_for_function("document.documentElement.lang === 'en'")
            assert page.locator("h1").inner_text() == "Tasks"
            browser.close()
    finally:
        stop(proc)
