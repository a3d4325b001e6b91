"""In a real browser at 1,366 x 768: the admin task list shows state, tenant, GPUs, server,
pending reason and age on one line per task, long values cut with the full text on hover,
and its live cells still update."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from kernel import live
from scheduling.models import Allocation, Task
from tests.agent_live import stop
from tests.conftest import make_server
from tests.test_live_end_to_end import CHROMIUM, CHROMIUM_ARGS, _daphne, static_root  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)"),
]
SHOTS = os.environ.get("PORTAL_SCREENSHOTS")
LONG_REASON = ("no server has 4 free GPUs with 70 GB (labels zone=a; gpu_model 'H100'); best has 2; next in line: "
               "GPUs reserved on gpu-server-rack12-node-0042.cluster.example.org, free by 2026-12-01 10:00 UTC at "
               "the latest")


def _tasks(acme, globex, alice) -> list[Task]:
    # Ids as a cluster that has run for a while has them (seven digits), not as the test
    # database's sequence happens to stand after the tests before this one.
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval(pg_get_serial_sequence('scheduling_task', 'id'), 4812000)")
    server = make_server("gpu-server-rack12-node-0042.cluster.example.org")
    made = []
    for i in range(12):
        running = i % 3 == 0
        task = Task.objects.create(
            tenant=acme if i % 2 else globex, submitter=alice, name=f"llm-finetune-deepseek-7b-lora-run-{i:03d}",
            command="python train.py", status="running" if running else "pending", gpu_count=1 + i % 4,
            gpu_memory_mb=40_960 if i % 2 else None, node=server if running else None,
            pending_reason="" if running else LONG_REASON, queue_position=None if running else i)
        if running:
            Allocation.objects.create(task=task, gpu=server.gpus.get(index=i // 3), node=server, memory_mb=40_960)
        made.append(task)
    return made


def _change_reason(task: Task) -> None:
    with transaction.atomic():
        Task.objects.filter(pk=task.pk).update(pending_reason="tenant acme at its GPU quota (8/8)")
        live.tasks_changed([(task.tenant_id, task.pk)])
    connection.close()


def test_the_task_list_reads_on_one_line_per_task_at_1366_px(tmp_path, static_root, acme, globex, alice,  # noqa: F811
                                                             channel_layer_on_test_db):
    from playwright.sync_api import sync_playwright

    tasks = _tasks(acme, globex, alice)
    get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    # daphne on the layer the test process pushes on (channel_layer_on_test_db: Redis when REDIS_URL
    # is set); _daphne alone would drop REDIS_URL and listen on Postgres, where no push arrives.
    host, proc = _daphne(tmp_path, "layout", static_root=static_root, redis=bool(os.environ.get("REDIS_URL")))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(f"http://{host}/admin/login/?next=/admin/scheduling/task/")
            page.fill("#id_username", "op")
            page.fill("#id_password", "pw-op-123456")
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/scheduling/task/")
            headers = page.locator("#result_list thead th").all_inner_texts()
            for wanted in ("STATUS", "TENANT", "GPUS", "SERVER", "PENDING REASON", "AGE"):
                assert wanted in [h.strip().upper() for h in headers], headers
            # Nothing wraps: every row is one text line high, and nothing runs off the screen.
            heights = page.evaluate("[...document.querySelectorAll('#result_list tbody tr')]"
                                    ".map(r => r.getBoundingClientRect().height)")
            assert len(heights) == 12 and max(heights) < 40, heights
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366
            if SHOTS:
                page.screenshot(path=os.path.join(SHOTS, "admin-task-list-1366.png"))
            # Every column is on screen: the list does not scroll sideways inside its box either.
            assert page.evaluate("(r => r.scrollWidth <= r.clientWidth)"
                                 "(document.querySelector('#changelist .results'))")
            age = page.evaluate("Math.max(...[...document.querySelectorAll('#result_list tbody tr td:last-child')]"
                                ".map(c => c.getBoundingClientRect().right))")
            assert age <= page.evaluate("document.querySelector('#changelist .results').getBoundingClientRect().right")
            # A long reason is cut, and whole on hover.
            reason = page.locator(f'[data-task="{tasks[1].pk}"][data-field="pending_reason"]')
            assert reason.get_attribute("title") == LONG_REASON
            assert reason.evaluate("e => e.scrollWidth > e.clientWidth")
            server = page.locator(f'[data-task="{tasks[0].pk}"][data-field="node"]')
            assert server.get_attribute("title") == "gpu-server-rack12-node-0042.cluster.example.org"

            # The live cells still follow the database.
            page.wait_for_function("document.documentElement.getAttribute('data-live') === 'open'", timeout=20_000)
            # (ORM calls cannot run inside playwright's event loop: a thread makes the change.)
            with ThreadPoolExecutor(1) as pool:
                pool.submit(_change_reason, tasks[1]).result()
            page.wait_for_function(
                f"document.querySelector('[data-task=\"{tasks[1].pk}\"][data-field=\"pending_reason\"]').title"
                " === 'tenant acme at its GPU quota (8/8)'", timeout=20_000)
            browser.close()
    finally:
        stop(proc)
