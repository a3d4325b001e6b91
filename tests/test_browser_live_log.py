"""In a real browser, the task page's log follows a task a real agent is running:
it opens at the newest lines and new output appears without a reload."""

from __future__ import annotations

import os

import pytest

from nodes.enrolment import issue_join_token
from tests.agent_live import Agents, assign, server_ready, stop, task_log, wait_for
from tests.test_live_end_to_end import CHROMIUM, CHROMIUM_ARGS, _daphne, static_root  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)"),
]

# 400 lines at once, then a tick every 0.2 s: the page must open at the end, not at "boot 0".
# A shell loop: tasks run as an unprivileged account that cannot reach this checkout's Python.
TASK = ("i=0; while [ $i -lt 400 ]; do echo boot $i; i=$((i+1)); done; "
        "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done")


def test_the_task_page_opens_at_the_newest_lines_and_follows_a_running_task(
        tmp_path, static_root, acme, alice, channel_layer_on_test_db):  # noqa: F811
    from playwright.sync_api import sync_playwright

    host, portal = _daphne(tmp_path, "log", static_root=static_root)
    token_file = tmp_path / "join-token"
    token_file.write_text(issue_join_token(note="tests"))
    agents = Agents(tmp=tmp_path, join_token_file=token_file)
    try:
        agents.start("sim-log", [f"http://{host}"], gpus="1xH100-80GB")
        node = server_ready("sim-log", gpus=1)
        task = assign(node, acme, TASK, [0], submitter=alice, name="ticker")
        wait_for(lambda: "tick 1\n" in task_log(task), 30, "the task's first ticks to be stored")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1366, "height": 800})
            page.goto(f"http://{host}/accounts/login/?next=/tasks/{task.pk}/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice")
            page.click("button[type=submit]")
            page.wait_for_url(f"**/tasks/{task.pk}/")
            log = page.locator("#task-log")
            opened = log.inner_text()
            assert "boot 0\n" not in opened and "boot 399" in opened  # the newest lines, not the first
            last_tick = max(int(line.split()[1]) for line in opened.splitlines() if line.startswith("tick"))
            page.wait_for_function("document.getElementById('task-log').getAttribute('data-log-live') === 'open'",
                                   timeout=20_000)
            # Output written after the page loaded appears in it, and the view stays at the bottom.
            page.wait_for_function(
                f"document.getElementById('task-log').textContent.includes('tick {last_tick + 5}\\n')", timeout=30_000)
            text = log.inner_text()
            ticks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("tick")]
            assert ticks == list(range(ticks[0], ticks[-1] + 1))  # nothing lost or shown twice
            assert page.evaluate("(e => e.scrollHeight - e.scrollTop - e.clientHeight)(document.getElementById"
                                 "('task-log'))") < 24
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload
            page.screenshot(path=str(tmp_path / "live-log.png"))
            browser.close()
    finally:
        agents.stop_all()
        stop(portal)


def test_a_gangs_task_page_switches_its_live_log_to_the_chosen_rank(
        tmp_path, static_root, acme, alice, channel_layer_on_test_db):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    from playwright.sync_api import sync_playwright

    from kernel import live
    from scheduling.models import Task, TaskLogChunk, TaskRank
    from tests.conftest import make_server

    nodes = [make_server("rank-a", gpus=1), make_server("rank-b", gpus=1)]
    task = Task.objects.create(tenant=acme, submitter=alice, name="ddp", command="torchrun train.py",
                               status="running", gpu_count=2, nodes=2)
    for rank, node in enumerate(nodes):
        TaskRank.objects.create(task=task, attempt=0, rank=rank, node=node)
        TaskLogChunk.objects.create(task=task, attempt=0, rank=rank, offset=0, data=f"hello from rank {rank}\n")

    def write(rank: int, text: str) -> None:
        from django.db import connection

        last = TaskLogChunk.objects.filter(task=task, rank=rank).order_by("-offset").first()
        TaskLogChunk.objects.create(task=task, attempt=0, rank=rank, offset=last.offset + len(last.data), data=text)
        live.log_appended(task.pk)
        connection.close()

    # daphne on the layer this process pushes on (Redis when REDIS_URL is set).
    host, portal = _daphne(tmp_path, "ranks", static_root=static_root, redis=bool(os.environ.get("REDIS_URL")))
    try:
        with sync_playwright() as p, ThreadPoolExecutor(1) as pool:  # (no ORM inside playwright's loop)
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(f"http://{host}/accounts/login/?next=/tasks/{task.pk}/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice")
            page.click("button[type=submit]")
            page.wait_for_url(f"**/tasks/{task.pk}/")
            assert page.locator("#task-log").inner_text() == "hello from rank 0\n"
            page.select_option("#task-log-rank", "1")
            page.wait_for_function("document.getElementById('task-log').textContent === 'hello from rank 1\\n'",
                                   timeout=20_000)
            assert page.url.endswith("?rank=1")
            page.wait_for_function("document.getElementById('task-log').getAttribute('data-log-live') === 'open'",
                                   timeout=20_000)
            pool.submit(write, 0, "rank 0 again\n").result()
            pool.submit(write, 1, "rank 1 again\n").result()
            page.wait_for_function("document.getElementById('task-log').textContent.includes('rank 1 again')",
                                   timeout=20_000)
            assert page.locator("#task-log").inner_text() == "hello from rank 1\nrank 1 again\n"
            assert "rank=1" in page.get_attribute("#task-log-full", "href")
            browser.close()
    finally:
        stop(portal)
