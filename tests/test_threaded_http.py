"""HTTP through a real server runs Django's sync handler on a thread pool
(portal/threaded_http.py): streamed responses, coroutine views and concurrent
requests behave as they did under Django's ASGI handler."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from scheduling.models import Task, TaskLogChunk
from tests.conftest import make_api_token

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_streamed_log_and_a_submit_pass_through_the_pool_unchanged(live_daphne, alice, servers):
    token = make_api_token(alice)
    created = httpx.post(f"{live_daphne}/api/v1/tasks", json={"tenant": "acme", "command": "python train.py"},
                         headers={"Authorization": f"Token {token}"}, timeout=20)
    assert created.status_code == 201, created.text
    task = Task.objects.get(pk=created.json()["id"])
    # More than one 64 KiB ASGI message, streamed from a server-side cursor in the pool thread.
    lines = [f"line {i:06d} " + "x" * 990 + "\n" for i in range(300)]
    TaskLogChunk.objects.bulk_create(
        TaskLogChunk(task=task, attempt=0, rank=0, offset=sum(map(len, lines[:i])), data=line)
        for i, line in enumerate(lines))
    staff = get_user_model().objects.create_user("ops", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    cookies = {"sessionid": client.cookies["sessionid"].value}
    log = httpx.get(f"{live_daphne}/tasks/{task.pk}/log/", cookies=cookies, timeout=20)
    assert log.status_code == 200
    assert log.text == "".join(lines)
    assert log.headers["content-disposition"] == f'inline; filename="task-{task.pk}-attempt-0.log"'
    bad = httpx.get(f"{live_daphne}/tasks/{task.pk}/log/?attempt=x", cookies=cookies, timeout=20)
    assert bad.status_code == 400 and bad.text == "attempt must be a whole number\n"


def test_the_agents_long_poll_still_runs_as_a_coroutine_view(live_daphne):
    from portal.asgi import application  # noqa: F401  (Django is set up: the app builds)
    from portal.threaded_http import ThreadedHTTP

    http = ThreadedHTTP(threads=1)
    assert http._is_async_view("/api/agent/v1/assignments")
    assert not http._is_async_view("/api/v1/tasks") and not http._is_async_view("/no/such/page/")
    refused = httpx.get(f"{live_daphne}/api/agent/v1/assignments", headers={"Authorization": "Node node_x_y"},
                        timeout=20)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Node"


def test_requests_are_served_side_by_side(live_daphne, alice):
    token = make_api_token(alice)

    def quota(_):
        return httpx.get(f"{live_daphne}/api/v1/quota", headers={"Authorization": f"Token {token}"}, timeout=20)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(quota, range(32)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1
