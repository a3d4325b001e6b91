"""What the portal shows to whom: /metrics only to Prometheus, control-plane hosts
and pids only to staff, a tenant's models only to that tenant, password guessing
throttled, and production never without a real SECRET_KEY."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.utils import timezone

from kernel.models import ControlPlaneServer
from nodes.models import GPU
from scheduling.models import Task

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tenants_on_gpus(acme, globex, servers):
    Task.objects.create(tenant=globex, name="secret", command="x", model_name="globex-private-llm")
    gpu = servers[0].gpus.get(index=0)
    GPU.objects.filter(pk=gpu.pk).update(loaded_models={"globex-private-llm": timezone.now().isoformat(),
                                                        "llama-8b": timezone.now().isoformat()})
    return gpu


def test_metrics_need_the_bearer_token_or_an_allowed_address(client, settings, tenants_on_gpus):
    settings.METRICS_TOKEN = "prom-" + "s" * 40
    remote = {"REMOTE_ADDR": "10.9.8.7"}
    anonymous = client.get("/metrics", **remote)
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"].startswith("Bearer")
    for leak in (b"acme", b"globex", b"gpu-01", b"GPU-gpu-01-0"):
        assert leak not in anonymous.content
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong", **remote).status_code == 401
    scraped = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}", **remote)
    assert scraped.status_code == 200 and b"globex" in scraped.content

    # Loopback is allowed by default, but not when it is a proxy passing someone on.
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 401
    settings.METRICS_ALLOW_FROM = []
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 401


def test_the_cluster_view_shows_hosts_and_pids_to_staff_only(api_client_for, alice, staff):
    ControlPlaneServer.objects.create(name="web-a:4242:web", role="web", hostname="web-a.internal", pid=4242,
                                      last_seen_at=timezone.now())
    user_view = api_client_for(alice).get("/api/v1/cluster").json()["servers"]
    assert user_view and all("hostname" not in s and "pid" not in s for s in user_view)
    assert "web-a.internal" not in str(user_view) and "4242" not in str([s.get("pid") for s in user_view])
    staff_view = api_client_for(staff).get("/api/v1/cluster").json()["servers"]
    assert staff_view[0]["hostname"] == "web-a.internal" and staff_view[0]["pid"] == 4242


def test_users_see_only_the_cached_models_their_tenants_use(api_client_for, alice, carol, staff, acme,
                                                            tenants_on_gpus):
    Task.objects.create(tenant=acme, name="mine", command="x", model_name="llama-8b")

    def models(user, url="/api/v1/gpus"):
        gpus = api_client_for(user).get(url).json()
        if url.endswith("servers"):
            gpus = [g for s in gpus for g in s["gpus"]]
        return sorted({m for g in gpus for m in g["loaded_models"]})

    assert models(alice) == models(alice, "/api/v1/servers") == ["llama-8b"]
    assert models(carol) == ["globex-private-llm"]
    assert models(staff) == ["globex-private-llm", "llama-8b"]


def test_password_guessing_is_locked_out_after_the_failure_limit(client, alice, settings):
    codes = [client.post("/accounts/login/", {"username": "alice", "password": "guess"}).status_code
             for _ in range(settings.AXES_FAILURE_LIMIT)]
    assert codes[:-1] == [200] * (settings.AXES_FAILURE_LIMIT - 1)  # the form again, with its error
    locked = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert locked.status_code in (403, 429)
    assert "_auth_user_id" not in client.session
    admin = client.post("/admin/login/", {"username": "alice", "password": "pw-alice"})
    assert admin.status_code in (403, 429)


@pytest.mark.parametrize("key, ok", [
    (None, False),
    ("short", False),
    ("django-insecure-" + "x7" * 30, False),
    ("a" * 60, False),
    ("Zr4-q" * 12, True),
])
def test_production_always_requires_a_real_secret_key(key, ok):
    from tests.conftest import subprocess_env

    env = subprocess_env(PORTAL_PRODUCTION="true", DEBUG="true")
    env.pop("SECRET_KEY", None)
    env.pop("SECRET_KEY_FILE", None)
    if key is not None:
        env["SECRET_KEY"] = key
    result = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode == 0) == ok, result.stderr[-500:]
    if not ok:
        assert "SECRET_KEY" in result.stderr.strip().splitlines()[-1]
