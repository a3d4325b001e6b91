"""Shared fixtures: tenant acme (alice, bob), tenant globex (carol), a staff
operator, and two active servers with GPUs. All on real PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from nodes.models import GPU, Node, NodeStatus
from tenants.models import Membership, Quota, Tenant


def database_url() -> str:
    """A URL for the database the tests use (the test_ database), for subprocesses."""
    s = connection.settings_dict
    user = quote(s.get("USER") or "")
    password = quote(s.get("PASSWORD") or "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = s.get("HOST") or ""
    if host.startswith("/"):
        return f"postgresql://{auth}/{s['NAME']}?host={quote(host)}" + (f"&port={s['PORT']}" if s.get("PORT") else "")
    port = f":{s['PORT']}" if s.get("PORT") else ""
    return f"postgresql://{auth}{host}{port}/{s['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PORTAL_CONFIG"}
    return {**env, "DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1", **extra}


def wait_for(condition: Callable[[], object], timeout: float = 20, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _language_of_the_test_thread():
    """Each test starts in the default language: a request with ``Accept-Language: zh-hans`` leaves
    Chinese active in this thread (LocaleMiddleware activates it and nothing resets it), which
    would leak into the next test's messages."""
    from django.utils import translation

    translation.deactivate()
    yield
    translation.deactivate()


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("operator", "op@example.com", "pw-operator", is_staff=True,
                                                is_superuser=True)


@pytest.fixture
def acme(db) -> Tenant:
    tenant = Tenant.objects.create(name="Acme Research", slug="acme")
    Quota.objects.create(tenant=tenant, max_gpus=8, max_gpu_memory_mb=640_000, max_running_tasks=8)
    return tenant


@pytest.fixture
def globex(db) -> Tenant:
    tenant = Tenant.objects.create(name="Globex", slug="globex")
    Quota.objects.create(tenant=tenant, max_gpus=4, max_gpu_memory_mb=320_000, max_running_tasks=4)
    return tenant


@pytest.fixture
def alice(acme):
    user = get_user_model().objects.create_user("alice", "alice@example.com", "pw-alice")
    Membership.objects.create(user=user, tenant=acme, role=Membership.Role.ADMIN)
    return user


@pytest.fixture
def bob(acme):
    user = get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob")
    Membership.objects.create(user=user, tenant=acme, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def carol(globex):
    user = get_user_model().objects.create_user("carol", "carol@example.com", "pw-carol")
    Membership.objects.create(user=user, tenant=globex, role=Membership.Role.MEMBER)
    return user


def make_server(name: str, gpus: int = 8, memory_mb: int = 81_559, model: str = "NVIDIA H100 80GB HBM3",
                labels: dict | None = None, status: str = NodeStatus.ACTIVE) -> Node:
    node = Node.objects.create(name=name, hostname=f"{name}.local", labels=labels or {}, status=status)
    GPU.objects.bulk_create(
        GPU(node=node, index=i, uuid=f"GPU-{name}-{i}", model_name=model, memory_total_mb=memory_mb)
        for i in range(gpus)
    )
    return node


@pytest.fixture
def servers(db) -> list[Node]:
    return [make_server("gpu-01"), make_server("gpu-02")]


_REAL_CHANNEL_LAYERS: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _in_process_channel_layer():
    """Inside the test process pushes go through an in-memory layer by default
    (consumer tests run in this process); tests that need the real layer (to reach
    daphne subprocesses) ask for ``channel_layer_on_test_db``."""
    import copy

    from django.conf import settings

    _REAL_CHANNEL_LAYERS.update(copy.deepcopy(settings.CHANNEL_LAYERS))
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # The in-memory layer lives in the test's own event loop: send from the committing
    # thread there (tests/test_live_publisher.py covers the background publisher).
    settings.LIVE_PUBLISH_IN_BACKGROUND = False
    reset_channel_layer()
    yield


def reset_channel_layer() -> None:
    """Forget the process's channel layer, so the next use builds a fresh one."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()


@pytest.fixture
def channel_layer_on_test_db(settings, django_db_setup):
    """The real channel layer (Postgres, or Redis with REDIS_URL), pointed at the test
    database, so pushes sent from the test process (``kernel.live``) reach
    subprocesses (daphne) running on it."""
    layers = {name: {**conf, "CONFIG": dict(conf.get("CONFIG", {}))} for name, conf in _REAL_CHANNEL_LAYERS.items()}
    for conf in layers.values():
        if conf["BACKEND"].endswith("PostgresChannelLayer"):
            conf["CONFIG"]["NAME"] = connection.settings_dict["NAME"]
    settings.CHANNEL_LAYERS = layers
    reset_channel_layer()
    from portal.channel_layer import forget_pool

    # Pools opened before may point at another database; those of loops async_to_sync has
    # closed keep idle connections that would hold the test database busy.
    forget_pool()
    yield layers
    forget_pool()
    reset_channel_layer()




# --- users' API (issue 5) --------------------------------------------------------


def make_api_token(user, name: str = "test") -> str:
    from portal.api.authentication import create_token

    return create_token(user, name)[1]


@pytest.fixture
def api_client_for(db):
    """``api_client_for(user)``: a DRF client authenticated with a fresh API token of ``user``."""
    from rest_framework.test import APIClient

    def make(user):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {make_api_token(user)}")
        return client

    return make


@contextmanager
def daphne(env: dict[str, str]) -> Iterator[str]:
    """A real daphne on a free port with ``env`` (``subprocess_env(...)``): its base URL while the block runs."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daphne did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def live_daphne(django_db_setup, django_db_blocker):
    """A real daphne on a free port against the test database, for the module's tests
    (which use ``django_db(transaction=True)`` so what they write is visible to it)."""
    with django_db_blocker.unblock():
        env = subprocess_env(API_RATE_LIMIT="0")
    with daphne(env) as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def _compiled_translations():
    """The Chinese catalogue compiled from its .po (make does it too; this covers a bare pytest run)."""
    from portal.i18n import compile_all

    compile_all()
