"""`make run`'s command starts a working admin, with a generated password shown once."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from kernel.models import ControlPlaneServer
from nodes.models import Node
from tenants.models import Tenant
from tests.conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def _run_until_ready(port: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "devrun", "--port", str(port)], cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line.rstrip())
        if "portal ready" in line:
            return proc, lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail("devrun did not become ready:\n" + "\n".join(lines))


def _demo_servers_up() -> bool:
    nodes = list(Node.objects.order_by("name"))
    return [n.name for n in nodes] == ["demo-gpu-01", "demo-gpu-02"] and all(
        n.status == "active" and n.gpus.count() == 8 and n.last_heartbeat_at for n in nodes)


def _wait_for_demo_servers() -> None:
    deadline = time.monotonic() + 30
    while not _demo_servers_up() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _demo_servers_up(), list(Node.objects.values_list("name", "status"))


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.django_db(transaction=True)
def test_devrun_serves_the_admin_and_prints_the_admin_password_once():
    port = free_port()
    proc, lines = _run_until_ready(port)
    try:
        passwords = [m.group(1) for line in lines if (m := re.search(r"admin / (\S+)", line))]
        assert len(passwords) == 1
        assert get_user_model().objects.get(username="admin").check_password(passwords[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=10) as response:
            assert response.status == 200
            assert b"GPU allocation portal" in response.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/admin/css/base.css", timeout=10) as response:
            assert response.status == 200
        assert Tenant.objects.filter(slug="demo", quota__isnull=False).exists()
        # The demo servers are the two simulated agents, enrolled with seed_demo's join token.
        _wait_for_demo_servers()
        # The scheduler loop runs too: it registers itself with a heartbeat.
        deadline = time.monotonic() + 30
        while not ControlPlaneServer.objects.filter(role="scheduler").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ControlPlaneServer.objects.filter(role="scheduler").exists()
    finally:
        assert _stop(proc) == 0

    # A second run reuses the data: no new password, no duplicate demo data.
    proc, lines = _run_until_ready(free_port())
    try:
        assert not any(re.search(r"admin / ", line) for line in lines)
        assert any("admin user exists" in line for line in lines)
        _wait_for_demo_servers()
        assert Node.objects.count() == 2
    finally:
        assert _stop(proc) == 0


@pytest.mark.django_db(transaction=True)
def test_nothing_devrun_started_outlives_it_even_when_it_is_killed_outright():
    """`make run` stopped hard (SIGKILL, before it can stop its children): the kernel tells
    every child to stop (PR_SET_PDEATHSIG), and the q cluster takes its workers with it."""
    import psutil

    from tests.conftest import wait_for

    proc, _ = _run_until_ready(free_port())
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "qcluster" in names and "runscheduler" in names and "daphne" in names
        assert len(descendants) > 4  # the q cluster's own worker processes too
    finally:
        proc.kill()
        proc.wait(10)

    def running() -> list[str]:
        alive = []
        for p in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.cmdline()[:4]))
        return alive

    # Each child stops gracefully on the kernel's SIGTERM (a q worker finishes its task, the web
    # server its open requests): seconds on a quiet machine, longer on a loaded CI one.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not running(), 60, "every process devrun started to stop")
    left = running()
    for p in descendants:  # never leave them behind to disturb the tests after this one
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert left == [], f"still running 60 s after devrun was killed: {left}"



@pytest.mark.django_db(transaction=True)
def test_a_stop_while_devrun_is_still_starting_its_processes_is_an_orderly_one():
    """SIGTERM (or Ctrl-C) as soon as the first child started, while the others are being forked.

    A stop that raised from the signal handler could land inside logging's after-fork callback,
    where Python prints the exception and drops it: devrun then started everything and ran on.
    """
    import os

    import psutil

    proc = subprocess.Popen(
        [sys.executable, "manage.py", "devrun", "--port", str(free_port())], cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    children: list[psutil.Process] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("started web"):
                proc.send_signal(signal.SIGTERM)
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        code = proc.wait(60)
        left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
        proc.wait()
    lines.extend(proc.stdout.read().splitlines())  # the session is gone: nothing holds the pipe open
    assert code == 0, "\n".join(lines)
    assert "stopping..." in lines, "\n".join(lines)
    assert not any("Traceback" in line or "Exception ignored" in line for line in lines), "\n".join(lines)
    assert "portal ready" not in "\n".join(lines)
    assert left == []
