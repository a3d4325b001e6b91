"""Who may use the users' API, and what they see: the tenant-isolation matrix,
token rules, node tokens refused, throttling."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from portal.api.authentication import create_token
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskLogChunk
from tenants.models import ApiToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme_task(acme, alice, servers):
    task = Task.objects.create(tenant=acme, submitter=alice, name="secret-acme", command="x")
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data="acme output\n")
    return task


@pytest.fixture
def as_carol(api_client_for, carol):
    return api_client_for(carol)


@pytest.mark.parametrize("suffix", ["", "/events", "/logs", "/logs?tail=5"])
def test_a_globex_user_gets_404_on_acme_tasks(as_carol, acme_task, suffix):
    r = as_carol.get(f"/api/v1/tasks/{acme_task.pk}{suffix}")
    assert r.status_code == 404
    assert b"acme" not in r.content


def test_a_globex_user_cannot_cancel_an_acme_task(as_carol, acme_task):
    assert as_carol.post(f"/api/v1/tasks/{acme_task.pk}/cancel").status_code == 404
    assert Task.objects.get(pk=acme_task.pk).status == TaskStatus.PENDING


def test_a_globex_user_cannot_list_acme_tasks(as_carol, acme_task, globex, carol):
    Task.objects.create(tenant=globex, submitter=carol, name="mine", command="x")
    names = [t["name"] for t in as_carol.get("/api/v1/tasks").json()["results"]]
    assert names == ["mine"]
    assert as_carol.get("/api/v1/tasks?tenant=acme").json()["count"] == 0


def test_a_globex_user_cannot_submit_into_acme(as_carol, servers):
    r = as_carol.post("/api/v1/tasks", {"command": "x", "tenant": "acme"}, format="json")
    assert r.status_code == 400 and "Unknown tenant" in r.json()["tenant"][0]
    assert not Task.objects.exists()


def test_a_globex_user_sees_only_their_own_quota(as_carol):
    assert [q["tenant"] for q in as_carol.get("/api/v1/quota").json()] == ["globex"]


def test_a_colleague_in_the_same_tenant_sees_the_task(api_client_for, bob, acme_task):
    assert api_client_for(bob).get(f"/api/v1/tasks/{acme_task.pk}").json()["name"] == "secret-acme"


USER_ENDPOINTS = ["/api/v1/tasks", "/api/v1/gpus", "/api/v1/servers", "/api/v1/quota", "/api/v1/cluster"]


@pytest.mark.parametrize("path", USER_ENDPOINTS)
def test_an_agent_node_token_cannot_use_user_endpoints(servers, acme_task, path):
    node_token = servers[0].issue_token()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {node_token}")
    r = client.get(path)
    assert r.status_code == 401
    assert r.json()["detail"] == "Agent tokens cannot use the users' API."


@pytest.mark.parametrize("path", USER_ENDPOINTS)
def test_a_node_token_in_the_agents_header_form_is_not_a_user_login(servers, path):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {servers[0].issue_token()}")
    assert client.get(path).status_code == 401


def test_an_agent_node_token_cannot_submit_or_cancel(servers, acme_task):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {servers[0].issue_token()}")
    assert client.post("/api/v1/tasks", {"command": "x", "tenant": "acme"}, format="json").status_code == 401
    assert client.post(f"/api/v1/tasks/{acme_task.pk}/cancel").status_code == 401
    assert Task.objects.count() == 1 and Task.objects.get().status == TaskStatus.PENDING


@pytest.mark.parametrize("path", USER_ENDPOINTS)
def test_anonymous_requests_are_refused(db, path):
    assert APIClient().get(path).status_code == 401


@pytest.mark.parametrize("header", ["Token api_nonsense", "Token api_", "Token", "Token a b", "Token zzz_abc"])
def test_a_wrong_or_malformed_token_is_refused(db, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert client.get("/api/v1/tasks").status_code == 401


def test_a_revoked_or_expired_token_is_refused(alice):
    row, secret = create_token(alice, "laptop")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    assert client.get("/api/v1/tasks").status_code == 200
    ApiToken.objects.filter(pk=row.pk).update(enabled=False)
    assert client.get("/api/v1/tasks").json()["detail"] == "This token was revoked."
    ApiToken.objects.filter(pk=row.pk).update(enabled=True, expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get("/api/v1/tasks").json()["detail"] == "This token has expired."


def test_tokens_are_stored_hashed_and_last_used_is_written_at_most_once_a_minute(alice):
    row, secret = create_token(alice, "laptop")
    assert secret not in (row.prefix, row.digest) and secret.startswith(row.prefix)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    client.get("/api/v1/quota")
    first = ApiToken.objects.get(pk=row.pk).last_used_at
    assert first is not None
    client.get("/api/v1/quota")
    assert ApiToken.objects.get(pk=row.pk).last_used_at == first
    ApiToken.objects.filter(pk=row.pk).update(last_used_at=first - timedelta(minutes=2))
    client.get("/api/v1/quota")
    assert ApiToken.objects.get(pk=row.pk).last_used_at > first


def test_the_browser_session_works_too(client, alice):
    client.force_login(alice)
    assert client.get("/api/v1/quota").status_code == 200


@override_settings(API_RATE_LIMIT=1, API_RATE_BURST=3)
def test_requests_beyond_the_tokens_rate_are_throttled_per_token(api_client_for, alice, bob):
    client = api_client_for(alice)
    codes = [client.get("/api/v1/quota").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
    throttled = client.get("/api/v1/quota")
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) >= 1
    assert api_client_for(bob).get("/api/v1/quota").status_code == 200  # another token, another bucket
