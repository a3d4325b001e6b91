"""Real agent processes (simulated GPUs, no Django) against a live portal on the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from nodes.enrolment import issue_join_token
from nodes.models import GPU
from scheduling import lifecycle
from scheduling.models import ModelMemoryEstimate, Task
from tests.agent_live import (
    ROOT,
    Agents,
    assign,
    server_ready,
    start_portal,
    stop,
    task_log,
    task_processes,
    wait_for,
)

PY = sys.executable
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def portal(tmp_path, channel_layer_on_test_db):
    url, proc = start_portal(tmp_path)
    yield url
    stop(proc)


@pytest.fixture
def agents(tmp_path, portal):
    token_file = tmp_path / "join-token"
    token_file.write_text(issue_join_token(note="tests"))
    fleet = Agents(tmp=tmp_path, join_token_file=token_file)
    yield fleet
    fleet.stop_all()


def finished(task: Task, timeout: float = 20) -> Task:
    def done():
        task.refresh_from_db()
        return task.is_final or (task.status == "pending" and task.attempt > 0)

    wait_for(done, timeout, f"task {task.pk} to finish")
    return task


def test_a_task_sees_exactly_its_allocated_gpus_and_concurrent_tasks_never_share_one(agents, portal, acme):
    agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    show = "echo GPUS=$CUDA_VISIBLE_DEVICES; sleep 2"
    first = assign(node, acme, show, [1, 2])
    second = assign(node, acme, show, [5])
    # Both run at once, each on its own GPUs: the simulated GPUs see their processes.
    wait_for(lambda: GPU.objects.filter(node=node, index__in=[1, 2, 5], utilization_pct__gt=0).count() == 3,
             10, "the busy GPUs to report load")
    assert GPU.objects.get(node=node, index=1).memory_used_mb > 512
    assert not GPU.objects.filter(node=node, index__in=[0, 3, 4, 6, 7], utilization_pct__gt=0).exists()
    for task, expected in ((first, "GPUS=1,2"), (second, "GPUS=5")):
        finished(task)
        assert task.status == "succeeded", task.failure_reason
        assert task.exit_code == 0
        assert task_log(task).splitlines() == [expected]
        assert task.events.filter(to_status="running").count() == 1


def test_cancelling_a_sleeping_task_kills_its_whole_process_group(agents, portal, acme):
    agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    task = assign(node, acme, "sleep 600 & sleep 600; wait", [0])
    wait_for(lambda: len(task_processes(task.pk, "sim-01")) >= 3, 10, "the task's processes")
    wait_for(lambda: Task.objects.get(pk=task.pk).status == "running", 10, "the start report")
    lifecycle.cancel(task.pk, actor="user:alice")
    wait_for(lambda: not task_processes(task.pk, "sim-01"), 10, "every process of the task to be gone")
    task.refresh_from_db()
    assert task.status == "cancelled"


def test_a_task_past_its_timeout_is_killed_and_marked_timed_out(agents, portal, acme):
    agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    task = assign(node, acme, "echo begin; sleep 600", [3], timeout_s=1)
    finished(task)
    assert task.status == "timed_out"
    assert not task_processes(task.pk, "sim-01")
    assert task_log(task) == "begin\n"


def test_a_cuda_out_of_memory_is_reported_and_follows_the_oom_rule(agents, portal, acme):
    agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    oom = ("echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB' >&2; exit 1")
    task = assign(node, acme, oom, [4], model_name="llama-8b", gpu_memory_mb=10_000, max_retries=1)
    finished(task)
    # The OOM rule: the model's estimate rises by the factor and the task is retried.
    assert (task.status, task.oom, task.attempt) == ("pending", True, 1)
    assert ModelMemoryEstimate.objects.get(model_name="llama-8b").memory_mb == 12_000
    assert "CUDA out of memory" in task_log(task)


def test_an_agent_restarted_while_a_task_runs_reattaches_and_reports_it(agents, portal, acme, tmp_path):
    proc = agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    task = assign(node, acme, "echo waiting; while [ ! -e go ]; do sleep 0.05; done; echo done", [6])
    wait_for(lambda: Task.objects.get(pk=task.pk).status == "running", 10, "the task to start")
    os.kill(proc.pid, signal.SIGKILL)  # the agent dies; its task keeps running
    proc.wait(5)
    assert task_processes(task.pk, "sim-01")
    agents.start("sim-01", [portal])
    wait_for(lambda: "reattached" in agents.log("sim-01"), 10, "the restarted agent to reattach")
    (agents.work_dir(task) / "go").touch()
    finished(task)
    assert task.status == "succeeded"
    assert task_log(task) == "waiting\ndone\n"
    assert task.events.filter(to_status="running").count() == 1


def test_an_agent_fails_over_to_the_next_portal_url(agents, portal, acme):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    agents.start("sim-02", [dead, portal])
    node = server_ready("sim-02")
    task = assign(node, acme, "echo via failover", [0])
    finished(task)
    assert task.status == "succeeded" and task_log(task) == "via failover\n"


def test_a_gpu_error_injected_into_a_simulated_gpu_cordons_it(agents, portal, tmp_path):
    agents.start("sim-01", [portal])
    node = server_ready("sim-01")
    (tmp_path / "agents" / "sim-01" / "sim" / "ecc-2").write_text("1")
    gpu = wait_for(lambda: GPU.objects.filter(node=node, index=2, cordoned=True).first(), 10, "the cordon")
    assert "ECC" in gpu.cordon_reason


def test_the_agent_imports_no_django_and_exits_with_one_line_without_a_driver(tmp_path):
    code = ("import sys, nodes.agent.main, nodes.agent.fake_nvml, nodes.agent.runner; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'rest_framework', 'channels'}))")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = subprocess.run([PY, str(ROOT / "tests" / "agent_guard.py"), "--portal", "http://127.0.0.1:9",
                             "--state-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NVML" in lines[0] and "--simulate" in lines[0]
