"""The booking calendar in a real browser (Debian chromium via playwright): a tenant admin
requests a reservation by dragging across the week view, staff approve it in the admin,
and the calendar shows it with its tenant."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from scheduling.models import Reservation
from tests.agent_live import stop
from tests.test_live_end_to_end import CHROMIUM, CHROMIUM_ARGS, ROOT, _daphne

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def static_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("static")
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True,
                   env={**os.environ, "STATIC_ROOT": str(root)}, timeout=120)
    return root


def _orm(fn):
    """ORM calls from a thread: playwright's sync API runs an event loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _login(context, host: str, user: str, password: str, next_url: str, *, admin: bool = False):
    page = context.new_page()
    if admin:
        page.goto(f"http://{host}/admin/login/?next={next_url}")
        page.fill("#id_username", user)
        page.fill("#id_password", password)
        page.click("input[type=submit]")
    else:
        page.goto(f"http://{host}/accounts/login/?next={next_url}")
        page.fill("#id_username", user)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
    page.wait_for_url(f"**{next_url}")
    return page


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="Chromium not installed: apt-get install -y chromium (.ci/run does it)")
def test_request_by_drag_approve_in_the_admin_and_see_it_on_the_calendar(tmp_path, static_root, alice, servers):
    from playwright.sync_api import sync_playwright

    get_user_model().objects.create_user("op", password="pw-op-123456", is_staff=True, is_superuser=True)
    host, proc = _daphne(tmp_path, "calendar", static_root=static_root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = _login(browser.new_context(viewport={"width": 1400, "height": 1000}), host, "alice", "pw-alice",
                          "/calendar/")
            page.wait_for_selector(".fc-timegrid")
            page.click(".fc-next-button")  # next week: wholly in the future
            page.wait_for_selector(".fc-event.free-capacity")
            column = page.locator("td.fc-timegrid-col[data-date]").nth(2)
            day = column.get_attribute("data-date")
            x_box = column.bounding_box()
            top = page.locator('td.fc-timegrid-slot-lane[data-time="10:00:00"]').bounding_box()
            bottom = page.locator('td.fc-timegrid-slot-lane[data-time="11:30:00"]').bounding_box()
            x = x_box["x"] + x_box["width"] / 2
            page.mouse.move(x, top["y"] + top["height"] / 2)
            page.mouse.down()
            page.mouse.move(x, bottom["y"] + bottom["height"] / 2, steps=8)
            page.mouse.up()
            assert page.input_value("#id_starts_at") == f"{day} 10:00"
            assert page.input_value("#id_ends_at") == f"{day} 12:00"
            page.fill("#id_name", "paper-deadline")
            page.select_option("#id_tenant", "acme")
            page.fill("#id_gpu_count", "4")
            page.fill("#id_reason", "NeurIPS")
            page.click("#reservation-form button[type=submit]")
            page.wait_for_url("**/reservations/")
            assert "requested" in page.locator('[data-reservation="paper-deadline"]').inner_text()
            res = _orm(lambda: Reservation.objects.select_related("tenant").get())
            assert (res.gpu_count, res.tenant.slug, f"{res.starts_at:%Y-%m-%d %H:%M}") == (4, "acme",
                                                                                          f"{day} 10:00")

            admin = _login(browser.new_context(), host, "op", "pw-op-123456",
                           "/admin/scheduling/reservation/", admin=True)
            admin.check(f'input[name=_selected_action][value="{res.pk}"]')
            admin.select_option("select[name=action]", "approve")
            admin.click("button[name=index]")
            admin.wait_for_selector(".messagelist .success")
            assert "Reservation paper-deadline approved." in admin.locator(".messagelist").inner_text()

            page.goto(f"http://{host}/calendar/")
            page.wait_for_selector(".fc-timegrid")
            page.click(".fc-next-button")
            event = page.locator(".fc-event", has_text="paper-deadline · acme · 4 GPUs")
            event.wait_for()
            assert "paper-deadline" in event.inner_text()
            # The same calendar inside the admin.
            admin.goto(f"http://{host}/admin/calendar/")
            admin.wait_for_selector(".fc-timegrid")
            admin.click(".fc-next-button")
            admin.locator(".fc-event", has_text="paper-deadline · acme · 4 GPUs").wait_for()

            free = page.locator(f'.fc-daygrid-day[data-date="{day}"] .free-capacity, '
                                f'.fc-timegrid-col[data-date="{day}"] .free-capacity, '
                                f'td[data-date="{day}"] .free-capacity')
            assert "12 of 16 GPUs free" in free.first.inner_text()
            browser.close()
    finally:
        stop(proc)
