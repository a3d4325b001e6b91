"""A server whose agent dies goes offline after the heartbeat timeout, and its task
runs again on another server: real agents, daphne and runscheduler processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from django.db import transaction

from nodes.enrolment import issue_join_token
from nodes.models import Node
from scheduling import triggers
from scheduling.models import Task
from tests.agent_live import ROOT, Agents, server_ready, start_portal, stop, task_log, task_processes, wait_for
from tests.conftest import subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_killing_an_agent_takes_its_server_offline_and_its_task_runs_again_on_the_other(
        tmp_path, channel_layer_on_test_db, acme):
    url, portal = start_portal(tmp_path, heartbeat_interval_s=1, heartbeat_timeout_s=3)
    scheduler = subprocess.Popen(
        [sys.executable, "manage.py", "runscheduler"], cwd=ROOT, start_new_session=True,
        env=subprocess_env(PORTAL_CONFIG=str(tmp_path / "portal.yaml")),
        stdout=open(tmp_path / "scheduler.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    token = tmp_path / "join-token"
    token.write_text(issue_join_token())
    agents = Agents(tmp=tmp_path, join_token_file=token)
    orphans: list[int] = []
    try:
        first = agents.start("sim-a", [url], gpus="2xH100-80GB")
        server_ready("sim-a", gpus=2)
        with transaction.atomic():
            task = Task.objects.create(
                tenant=acme, name="survivor", gpu_count=1, gpu_memory_mb=1_000, max_retries=2,
                command='echo "ran on $GPU_SERVER"; [ "$GPU_SERVER" = sim-b ] || sleep 60')
            triggers.request_pass("test submit")
        wait_for(lambda: Task.objects.filter(pk=task.pk, status="running", node__name="sim-a").exists(), 20,
                 "the task to run on sim-a")
        agents.start("sim-b", [url], gpus="2xH100-80GB")
        server_ready("sim-b", gpus=2)

        orphans = task_processes(task.pk, "sim-a")
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: Node.objects.filter(name="sim-a", status="offline").exists(), 15,
                 "sim-a to go offline after the heartbeat timeout")
        wait_for(lambda: Task.objects.filter(pk=task.pk, status="succeeded").exists(), 20,
                 "the task to run again and succeed on sim-b")
        task.refresh_from_db()
        assert (task.node.name, task.attempt) == ("sim-b", 1)
        assert task_log(task).splitlines() == ["ran on sim-a", "ran on sim-b"]  # attempts 0 and 1
        assert list(task.log_chunks.filter(attempt=1).values_list("data", flat=True)) == ["ran on sim-b\n"]
        assert task.events.filter(reason__contains="sim-a lost").exists()
    finally:
        agents.stop_all()
        for pid in orphans:  # what the dead agent left behind, as a dead server would have
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        stop(scheduler)
        stop(portal)
