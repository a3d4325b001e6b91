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
