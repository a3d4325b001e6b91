"""Web processes cache verified tokens, yet a revocation refuses the very next request,
in this process and in another one (a real daphne on the test database)."""

from __future__ import annotations

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from nodes.models import Node
from portal.api.authentication import create_token
from tenants.models import ApiToken
from tests.conftest import make_server

pytestmark = pytest.mark.django_db(transaction=True)


def heartbeat(node: Node, token: str) -> dict:
    gpus = [{"index": g.index, "uuid": g.uuid, "name": g.model_name, "memory_total_mb": g.memory_total_mb,
             "memory_used_mb": 0, "utilization_pct": 0, "temperature_c": 40, "power_w": 100, "ecc_errors": 0,
             "retired_pages": 0} for g in node.gpus.order_by("index")]
    return {"name": node.name, "agent_version": "test", "gpus": gpus}


def test_a_cached_token_costs_no_token_lookup_until_it_is_revoked(alice):
    row, secret = create_token(alice, "laptop")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    assert client.get("/api/v1/quota").status_code == 200
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/api/v1/quota").status_code == 200
    assert not [q for q in queries.captured_queries if 'FROM "tenants_apitoken"' in q["sql"]]

    ApiToken.objects.filter(pk=row.pk).update(enabled=False)
    response = client.get("/api/v1/quota")
    assert response.status_code == 401 and response.json()["detail"] == "This token was revoked."


def test_a_token_revoked_here_is_refused_by_another_web_process_on_its_next_request(live_daphne, alice):
    row, secret = create_token(alice, "laptop")
    headers = {"Authorization": f"Token {secret}"}
    with httpx.Client(base_url=live_daphne, headers=headers, trust_env=False) as web:
        assert [web.get("/api/v1/quota").status_code for _ in range(3)] == [200, 200, 200]  # cached there now
        ApiToken.objects.filter(pk=row.pk).update(enabled=False)
        assert web.get("/api/v1/quota").status_code == 401

        # A user disabled from a shell counts the same.
        _, secret2 = create_token(alice, "ci")
        web.headers["Authorization"] = f"Token {secret2}"
        assert web.get("/api/v1/quota").status_code == 200
        get_user_model().objects.filter(pk=alice.pk).update(is_active=False)
        assert web.get("/api/v1/quota").status_code == 401


def test_a_servers_old_token_is_refused_by_another_web_process_once_a_new_one_is_issued(live_daphne, db):
    node = make_server("gpu-cache-01", gpus=2)
    old = node.issue_token()
    with httpx.Client(base_url=live_daphne, trust_env=False) as web:
        def beat(token: str) -> int:
            return web.post("/api/agent/v1/heartbeat", json=heartbeat(node, token),
                            headers={"Authorization": f"Node {token}"}).status_code

        assert [beat(old) for _ in range(2)] == [200, 200]
        new = node.issue_token()
        assert beat(old) == 401
        assert beat(new) == 200
