"""The users' web portal: pages need a login, the submit form shares the API's
validation, the fit preview runs the placement core, tokens are shown once."""

from __future__ import annotations

import re

import pytest

from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task, TaskLogChunk
from tenants.models import ApiToken, Quota

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice_in(client, alice, servers):
    client.force_login(alice)
    return client


@pytest.mark.parametrize("path", ["/", "/submit/", "/tasks/", "/tasks/1/", "/tokens/"])
def test_every_page_needs_a_login(client, db, path):
    r = client.get(path)
    assert r.status_code == 302 and r["Location"].startswith("/accounts/login/")


def test_the_login_page_logs_in(client, alice):
    assert client.get("/accounts/login/").status_code == 200
    r = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert r.status_code == 302 and r["Location"] == "/"
    assert b"Wrong username" in client.post("/accounts/login/", {"username": "alice", "password": "no"}).content


def test_the_dashboard_shows_quota_bars_my_tasks_and_the_cluster(alice_in, acme, alice, servers):
    task = Task.objects.create(tenant=acme, submitter=alice, name="my-train", command="x", status=TaskStatus.RUNNING,
                               node=servers[0])
    Allocation.objects.create(task=task, gpu=servers[0].gpus.first(), node=servers[0], memory_mb=1000)
    Task.objects.create(tenant=acme, submitter=alice, name="old-one", command="x", status=TaskStatus.SUCCEEDED)
    page = alice_in.get("/").content.decode()
    assert "GPUs: 1 / 8" in page and "Acme Research" in page
    assert "my-train" in page and "old-one" not in page
    assert re.search(r"<dt>Free</dt><dd>15</dd>", page)


def test_submitting_through_the_form_creates_a_task(alice_in, alice):
    r = alice_in.post("/submit/", {"tenant": "acme", "name": "form-task", "command": "python train.py",
                                   "gpu_count": "2", "gpu_memory_mb": "30000", "priority": "HIGH",
                                   "workload_class": "batch", "env": "SEED=1\nMODE=fast", "action": "submit"})
    task = Task.objects.get()
    assert r.status_code == 302 and r["Location"] == f"/tasks/{task.pk}/"
    assert (task.name, task.gpu_count, task.gpu_memory_mb, task.env, task.submitter) == (
        "form-task", 2, 30_000, {"SEED": "1", "MODE": "fast"}, alice)
    assert task.events.get().actor == "user:alice"


def test_an_invalid_form_shows_field_errors_and_creates_nothing(alice_in):
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "", "gpu_count": "64", "priority": "CRITICAL",
                                   "env": "not-an-assignment", "action": "submit"})
    assert r.status_code == 400
    page = r.content.decode()
    assert "Required: the command line to run" in page
    assert "Must be between 1 and 8" in page
    assert "Tenant acme may submit at most HIGH priority." in page
    assert "Line 1: expected KEY=VALUE." in page
    assert not Task.objects.exists()


def test_the_form_refuses_a_tenant_the_user_is_not_in(alice_in, globex):
    r = alice_in.post("/submit/", {"tenant": "globex", "command": "x", "action": "submit"})
    assert r.status_code == 400 and "Unknown tenant" in r.content.decode()
    assert not Task.objects.exists()


def test_the_preview_says_where_a_task_would_start_and_creates_nothing(alice_in):
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "x", "gpu_count": "4", "action": "preview"})
    page = r.content.decode()
    assert r.status_code == 200 and "Fits now." in page
    assert re.search(r"Would start now on gpu-0[12] \(GPUs gpu-0[12]:\d", page)
    assert not Task.objects.exists()


def test_the_preview_says_why_a_task_would_wait(alice_in, acme):
    Quota.objects.filter(tenant=acme).update(max_gpus=2)
    page = alice_in.post("/submit/", {"tenant": "acme", "command": "x", "gpu_count": "4",
                                      "action": "preview"}).content.decode()
    assert "Would not start now." in page and "quota" in page.lower()
    assert not Task.objects.exists()


def test_the_task_list_shows_only_my_tenants_tasks(client, carol, acme, globex, alice, servers):
    Task.objects.create(tenant=acme, submitter=alice, name="acme-secret", command="x")
    Task.objects.create(tenant=globex, submitter=carol, name="globex-job", command="x")
    client.force_login(carol)
    page = client.get("/tasks/").content.decode()
    assert "globex-job" in page and "acme-secret" not in page


def test_the_task_detail_shows_reason_position_events_and_log(alice_in, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="python t.py",
                               pending_reason="waiting behind 2 higher-priority tasks", queue_position=3)
    task.events.create(from_status="", to_status="pending", actor="user:alice", reason="submitted")
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data="hello from the task\n")
    page = alice_in.get(f"/tasks/{task.pk}/").content.decode()
    assert "waiting behind 2 higher-priority tasks" in page
    assert "<dt>Queue position</dt><dd>3</dd>" in page
    assert "user:alice" in page and "hello from the task" in page
    assert "Cancel task" in page
    # Attempts are counted from 1 wherever a person reads them.
    assert f"<dt>Attempt</dt><dd>1 of {task.max_retries + 1}</dd>" in page
    assert 'of attempt <span id="task-log-attempt">1</span>' in page


def test_another_tenants_task_detail_is_a_404_and_cannot_be_cancelled(client, carol, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x")
    client.force_login(carol)
    assert client.get(f"/tasks/{task.pk}/").status_code == 404
    assert client.post(f"/tasks/{task.pk}/cancel/").status_code == 404
    assert Task.objects.get(pk=task.pk).status == TaskStatus.PENDING


def test_cancel_from_the_detail_page(alice_in, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x")
    r = alice_in.post(f"/tasks/{task.pk}/cancel/")
    assert r.status_code == 302
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED


def test_a_member_cannot_cancel_a_colleagues_task_from_the_page(client, bob, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x")
    client.force_login(bob)
    assert "Cancel task" not in client.get(f"/tasks/{task.pk}/").content.decode()
    client.post(f"/tasks/{task.pk}/cancel/")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.PENDING


def test_a_new_token_is_shown_once_works_and_can_be_revoked(alice_in, alice):
    page = alice_in.post("/tokens/", {"name": "laptop"}).content.decode()
    secret = re.search(r'id="new-token">(api_[^<]+)<', page).group(1)
    row = ApiToken.objects.get(user=alice)
    assert row.name == "laptop" and secret.startswith(row.prefix) and secret not in row.digest
    assert secret not in alice_in.get("/tokens/").content.decode()

    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    assert api.get("/api/v1/quota").status_code == 200
    alice_in.post(f"/tokens/{row.pk}/revoke/")
    assert api.get("/api/v1/quota").status_code == 401


def test_a_token_without_a_name_or_with_bad_expiry_is_refused(alice_in, alice):
    r = alice_in.post("/tokens/", {"name": "", "expires_days": "0"})
    assert r.status_code == 400
    assert "Give the token a name" in r.content.decode() and "whole number of days" in r.content.decode()
    assert not ApiToken.objects.exists()


def test_nobody_revokes_another_users_token(client, carol, alice):
    from portal.api.authentication import create_token

    row, _ = create_token(alice, "alice's")
    client.force_login(carol)
    assert client.post(f"/tokens/{row.pk}/revoke/").status_code == 404
    assert ApiToken.objects.get(pk=row.pk).enabled


def test_staff_pick_any_tenant_in_the_form_and_must_name_one(client, staff, acme, globex, servers):
    client.force_login(staff)
    page = client.get("/submit/").content.decode()
    assert 'value="acme"' in page and 'value="globex"' in page
    r = client.post("/submit/", {"command": "x", "action": "submit"})
    assert r.status_code == 400 and "staff may submit for any tenant" in r.content.decode()
    r = client.post("/submit/", {"tenant": "globex", "command": "x", "action": "submit"})
    assert r.status_code == 302 and Task.objects.get().tenant == globex


def test_the_full_log_link_streams_one_attempts_whole_output(alice_in, client, carol, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x", attempt=1)
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data="first try\n")
    TaskLogChunk.objects.create(task=task, attempt=1, offset=0, data="a\n")
    TaskLogChunk.objects.create(task=task, attempt=1, offset=2, data="b\n")
    page = alice_in.get(f"/tasks/{task.pk}/").content.decode()
    assert f'href="/tasks/{task.pk}/log/?attempt=1">full log</a>' in page
    assert f'href="/tasks/{task.pk}/log/?attempt=0">1</a>' in page  # the earlier attempt, counted from 1
    r = alice_in.get(f"/tasks/{task.pk}/log/")
    assert r["Content-Type"].startswith("text/plain") and b"".join(r.streaming_content) == b"a\nb\n"
    assert b"".join(alice_in.get(f"/tasks/{task.pk}/log/?attempt=0").streaming_content) == b"first try\n"
    assert alice_in.get(f"/tasks/{task.pk}/log/?attempt=7").status_code == 400
    assert alice_in.get(f"/tasks/{task.pk}/log/?attempt=x").status_code == 400
    client.force_login(carol)
    assert client.get(f"/tasks/{task.pk}/log/").status_code == 404


def test_the_form_submits_a_gang_and_refuses_a_bad_one_with_the_apis_messages(alice_in):
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "torchrun train.py", "nodes": "2",
                                   "gpus_per_node": "9", "action": "submit"})
    assert r.status_code == 400 and "Must be between 1 and 8 (the most GPUs any one server has)." in r.content.decode()
    assert not Task.objects.exists()
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "torchrun train.py", "nodes": "2",
                                   "gpus_per_node": "8", "topology_key": "rack", "action": "submit"})
    assert r.status_code == 302, r.content.decode()[:2000]
    task = Task.objects.get()
    assert (task.gpu_count, task.nodes, task.topology_key) == (16, 2, "rack")


def test_the_form_submits_an_array_after_a_dependency(alice_in, alice, acme):
    first = Task.objects.create(tenant=acme, submitter=alice, name="prep", command="x")
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "python sweep.py", "array": "0-3%2",
                                   "dependency": f"afterok:{first.pk}", "action": "submit"})
    assert r.status_code == 302, r.content.decode()[:2000]
    elements = Task.objects.exclude(pk=first.pk)
    assert sorted(elements.values_list("array_index", flat=True)) == [0, 1, 2, 3]
    assert {t.dependencies.get().depends_on_id for t in elements} == {first.pk}
    r = alice_in.post("/submit/", {"tenant": "acme", "command": "x", "array": "9-1", "action": "submit"})
    assert r.status_code == 400 and "Bad range" in r.content.decode()


def test_pages_keep_their_messages_and_api_requests_make_no_message_storage(alice_in, acme, alice):
    """portal.middleware.PageMessages: the cancel's message reaches the next page; an API
    request (which never shows one) gets no message storage."""
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x")
    r = alice_in.post(f"/tasks/{task.pk}/cancel/", follow=True)
    assert f"Task {task.pk} cancelled." in r.content.decode()

    api = alice_in.get("/api/v1/tasks")
    assert api.status_code == 200
    assert not hasattr(api.wsgi_request, "_messages")


def test_the_task_list_counts_no_further_than_the_page_it_shows(alice_in, acme, alice, monkeypatch):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from portal import views

    monkeypatch.setattr(views, "TASK_LIST_COUNT_CAP", 60)
    Task.objects.bulk_create(Task(tenant=acme, submitter=alice, name=f"t{i}", command="x") for i in range(130))
    with CaptureQueriesContext(connection) as queries:
        first = alice_in.get("/tasks/").content.decode()
    assert "page 1 (more than 60 tasks)" in first and "page=2" in first
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert counts and all("LIMIT 61" in sql for sql in counts)
    second = alice_in.get("/tasks/?page=2").content.decode()
    assert "page 2 (more than 100 tasks)" in second and "page=3" in second
    last = alice_in.get("/tasks/?page=3").content.decode()
    assert "page 3 of 3 (130 tasks)" in last and "page=4" not in last
    for page in ("99999999999999999999999999999999", "-5", "x"):
        assert alice_in.get(f"/tasks/?page={page}").status_code == 200
