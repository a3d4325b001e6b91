"""At most one running copy: an agent cut off from every portal for longer than its
lease stops its tasks by itself, and reports them lost (retried, not failed) when a
portal answers again. Real daphne and agent processes."""

from __future__ import annotations

import signal
from urllib.parse import urlsplit

import pytest

from nodes.enrolment import issue_join_token
from scheduling.models import Task
from tests.agent_live import Agents, assign, server_ready, start_portal, stop, task_processes, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_agent_cut_off_longer_than_its_lease_stops_its_tasks_and_reports_them_lost(
        tmp_path, channel_layer_on_test_db, acme):
    # The portal tells the agent its lease (4 s here) in every heartbeat answer.
    url, portal = start_portal(tmp_path, heartbeat_interval_s=1, heartbeat_timeout_s=2,
                               extra_config="  agent_lease_s: 4\n")
    token = tmp_path / "join-token"
    token.write_text(issue_join_token())
    agents = Agents(tmp=tmp_path, join_token_file=token)
    try:
        agents.start("lease-a", [url], gpus="2xH100-80GB")
        node = server_ready("lease-a", gpus=2)
        task = assign(node, acme, "sleep 120", [0], max_retries=2)
        wait_for(lambda: Task.objects.filter(pk=task.pk, status="running").exists(), 20, "the task to run")
        assert task_processes(task.pk, "lease-a")

        stop(portal, signal.SIGKILL)  # every portal URL of this agent is gone
        wait_for(lambda: not task_processes(task.pk, "lease-a"), 15, "the agent to stop the task at its lease")
        # The agent logs after its fence returns, which may be just after the process is gone.
        wait_for(lambda: "stopping 1 task(s)" in agents.log("lease-a"), 5, "the agent to log the fence")

        _, portal = start_portal(tmp_path, heartbeat_interval_s=1, heartbeat_timeout_s=2,
                                         port=urlsplit(url).port, extra_config="  agent_lease_s: 4\n")
        wait_for(lambda: Task.objects.filter(pk=task.pk, status="pending", attempt=1).exists(), 20,
                 "the stopped copy to be reported lost and requeued")
        assert "lease 4 s" in task.events.order_by("-created_at", "-id").first().reason
    finally:
        agents.stop_all()
        stop(portal)
