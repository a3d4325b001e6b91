"""``manage.py qcluster`` stops on a SIGTERM that arrives at any moment of its start-up.

django-q2's own command dropped a signal that landed before its Sentinel was running; the
cluster then ran on, and under ``make run`` (where that signal is the kernel's one-shot "your
parent died") it was left orphaned. Each case sends the signal at an exact point of the
start-up from inside the real command, so the window is hit every time, not by timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

# Runs `manage.py qcluster` in this process after arranging for one SIGTERM to itself at the
# chosen point: the first call of the patched function sends it, then behaves as before.
HARNESS = r"""
import os, signal, sys
import django
django.setup()
import django_q.cluster as cluster
from multiprocessing.process import BaseProcess

def signal_first(owner, name):
    real = getattr(owner, name)
    def patched(*args, **kwargs):
        setattr(owner, name, real)  # once: the Sentinel's own children start normally
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    setattr(owner, name, patched)

point = sys.argv[1]
if point == "before-the-sentinel-exists":
    signal_first(cluster, "Event")  # the first thing Cluster.start() does
elif point == "while-the-sentinel-is-forked":
    signal_first(BaseProcess, "start")
from django.core.management import call_command
call_command("qcluster")
print("qcluster returned", flush=True)
"""


def _session_members(sid: int) -> list[str]:
    alive = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
    return alive


def _kill_all(members: list[str]) -> None:
    for line in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("point", ["before-the-sentinel-exists", "while-the-sentinel-is-forked"])
def test_a_sigterm_during_start_up_stops_the_whole_cluster(point):
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, point], cwd=ROOT,
                            env=subprocess_env(Q_WORKERS="1", DJANGO_SETTINGS_MODULE="portal.settings"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_all(_session_members(proc.pid))  # the cluster's children hold its stdout open too
        output, _ = proc.communicate()
        pytest.fail(f"the q cluster was still running 60 s after its SIGTERM:\n{output[-3000:]}")
    left = _session_members(proc.pid)
    _kill_all(left)
    assert proc.returncode == 0, output[-3000:]
    assert "qcluster returned" in output
    assert left == [], f"the cluster's processes outlived it: {left}"


class _DatabaseLink:
    """A TCP relay to PostgreSQL that the test can cut: the database is gone for whoever used it."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        # PostgreSQL over TCP, or on its unix socket (the embedded server: HOST is a directory).
        self.target = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (
            socket.AF_INET, (host, port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.cut_off = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.cut_off.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            family, address = self.target
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(address)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(2)

    def cut(self) -> None:
        self.cut_off.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(2)
                s.close()


@pytest.mark.django_db(transaction=True)
def test_the_cluster_stops_on_sigterm_after_its_database_is_gone(tmp_path):
    """``make run`` stops the embedded PostgreSQL with everything else: the q cluster must still stop."""
    from django.db import connection

    from tests.conftest import wait_for

    settings = connection.settings_dict
    link = _DatabaseLink(settings.get("HOST") or "127.0.0.1", int(settings.get("PORT") or 5432))
    user = settings.get("USER") or ""
    url = f"postgresql://{user}@127.0.0.1:{link.port}/{settings['NAME']}"
    log = tmp_path / "qcluster.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT,
                                env=subprocess_env(Q_WORKERS="2", DATABASE_URL=url),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "running." in log.read_text(), 60, "the q cluster to run")
        link.cut()
        # The database is gone and the cluster has noticed: its pusher failed to poll it.
        wait_for(lambda: "Failed to pull task from broker" in log.read_text(), 30, "the pusher to lose the database")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    except (subprocess.TimeoutExpired, AssertionError) as error:
        _kill_all(_session_members(proc.pid))
        proc.wait()
        pytest.fail(f"{error}\n{log.read_text()[-3000:]}")
    left = _session_members(proc.pid)
    _kill_all(left)
    assert left == [], f"the cluster's processes outlived it: {left}"
