"""The examples: the submit-N-and-wait client against a live portal, the deepseek task's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portal.api.authentication import create_token
from scheduling.choices import TaskStatus
from scheduling.models import Task

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db(transaction=True)
def test_the_example_client_submits_n_tasks_and_waits_for_them(live_daphne, alice, servers):
    token = create_token(alice, "example")[1]
    env = {**os.environ, "GPUCTL_CONFIG": "/nonexistent/gpuctl.json"}
    proc = subprocess.Popen(
        [sys.executable, "examples/submit_and_wait.py", "--url", live_daphne, "--token", token, "--tenant", "acme",
         "--tasks", "3", "--mem", "16G", "--poll", "0.2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while Task.objects.count() < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the example did not submit its tasks"
            time.sleep(0.1)
        # Stand in for the scheduler and agents: the tasks end, one of them badly.
        ids = sorted(Task.objects.values_list("pk", flat=True))
        Task.objects.filter(pk__in=ids[:2]).update(status=TaskStatus.SUCCEEDED)
        Task.objects.filter(pk=ids[2]).update(status=TaskStatus.FAILED, failure_reason="exit code 1")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert f"task {ids[2]} failed: exit code 1" in out
    assert "all 3 tasks ended: 2 succeeded, 1 did not" in out
    assert {t.gpu_memory_mb for t in Task.objects.all()} == {16_384}
    assert sorted(Task.objects.values_list("name", flat=True)) == ["example-0", "example-1", "example-2"]


def test_the_deepseek_task_dry_run_plans_without_weights():
    proc = subprocess.run([sys.executable, "examples/deepseek_infer.py", "--dry-run", "--prompt", "hi"], cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "3"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["gpus"] == ["3"] and plan["prompt"] == "hi"
    assert 14_000 < plan["estimated_gpu_memory_mb"] < 17_000


def test_the_deepseek_task_refuses_a_directory_that_is_not_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "examples/deepseek_infer.py", "--dry-run", "--model-path", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no config.json" in proc.stderr


def _runs_in_a_task_directory(argv: list[str], task_dir: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` the way an agent runs a task: in the task's own directory, not the repository."""
    return subprocess.run(argv, cwd=task_dir, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
                          capture_output=True, text=True, timeout=30)


def test_the_example_clients_default_command_runs_from_a_task_directory(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from submit_and_wait import default_command
    finally:
        sys.path.remove(str(ROOT / "examples"))
    proc = _runs_in_a_task_directory(default_command(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gpus"] == ["0"]


def test_the_readmes_deepseek_example_runs_from_a_task_directory(tmp_path):
    import re
    import shlex

    line = next(m.group(1) for m in re.finditer(r"`(gpuctl submit [^`]*deepseek_infer\.py[^`]*)`",
                                                (ROOT / "README.md").read_text()))
    command = line.split(" -- ", 1)[1]
    # The user's shell expands $PWD in the repository root; the task then runs elsewhere.
    argv = shlex.split(command.replace("$PWD", str(ROOT)))
    proc = _runs_in_a_task_directory(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr
