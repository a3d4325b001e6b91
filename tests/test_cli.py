"""gpuctl as a real subprocess against a real daphne on the test database."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from portal.api.authentication import create_token
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskLogChunk

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpuctl(live_daphne, alice, servers, tmp_path):
    config = tmp_path / "gpuctl" / "config.json"
    token = create_token(alice, "cli")[1]
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCTL_URL", "GPUCTL_TOKEN")}
    env["GPUCTL_CONFIG"] = str(config)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "cli.gpuctl", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"gpuctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    run.env = env
    run("login", "--url", live_daphne, "--token", token)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": live_daphne, "token": token}
    return run


def test_submit_queue_show_logs_and_cancel_through_the_cli(gpuctl):
    out = gpuctl("submit", "--gpus", "2", "--mem", "40G", "--priority", "high", "--tenant", "acme", "--name", "train",
                 "--env", "SEED=1", "--", "python", "train.py", "--lr", "0.1").stdout
    task = Task.objects.get(pk=int(out.strip()))
    assert (task.gpu_count, task.gpu_memory_mb, task.priority, task.command) == (
        2, 40_960, 2, "python train.py --lr 0.1")
    assert task.env == {"SEED": "1"}

    Task.objects.filter(pk=task.pk).update(pending_reason="waiting behind higher priority", queue_position=4)
    queue = gpuctl("queue").stdout.splitlines()
    assert queue[0].split() == ["ID", "NAME", "TENANT", "STATE", "PRIORITY", "GPUS", "POS", "REASON/SERVER"]
    assert queue[1].split()[:7] == [str(task.pk), "train", "acme", "pending", "HIGH", "2", "4"]
    assert queue[1].endswith("waiting behind higher priority")
    listed = json.loads(gpuctl("queue", "--json").stdout)
    assert [t["id"] for t in listed] == [task.pk]
    assert "queue_position:  4" in gpuctl("show", str(task.pk)).stdout

    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data="epoch 1\n")
    TaskLogChunk.objects.create(task=task, attempt=0, offset=8, data="epoch 2\n")
    assert gpuctl("logs", str(task.pk)).stdout == "epoch 1\nepoch 2\n"
    assert gpuctl("logs", "--tail", "1", str(task.pk)).stdout == "epoch 2\n"

    assert gpuctl("cancel", str(task.pk)).stdout.strip() == f"{task.pk} cancelled"
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED
    # The task has ended, so following its log prints everything and returns.
    assert gpuctl("logs", "-f", str(task.pk)).stdout == "epoch 1\nepoch 2\n"


def test_logs_follow_prints_new_output_until_the_task_ends(gpuctl, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="f", command="x", status=TaskStatus.RUNNING)
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data="a\n")
    proc = subprocess.Popen([sys.executable, "-m", "cli.gpuctl", "logs", "-f", "--interval", "0.2", str(task.pk)],
                            cwd=ROOT, env=gpuctl.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _read_available(proc).startswith("a\n"))
        TaskLogChunk.objects.create(task=task, attempt=0, offset=2, data="b\n")
        Task.objects.filter(pk=task.pk).update(status=TaskStatus.SUCCEEDED)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert _seen[proc.pid] + out == "a\nb\n"


def test_a_bad_flag_and_a_refused_submit_exit_non_zero_with_one_line(gpuctl):
    bad = gpuctl("submit", "--gpuz", "2", "--", "true", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["gpuctl: error: unrecognized arguments: --gpuz (see gpuctl --help)"]
    refused = gpuctl("submit", "--gpus", "9", "--", "true", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "gpuctl: error: gpu_count: Must be between 1 and 8 (the most GPUs any one server has), or a multiple "
        "of 8 up to 16 to span whole servers (or give nodes and gpus_per_node).")
    missing = gpuctl("show", "999999", check=False)
    assert missing.returncode == 1 and "no such task" in missing.stderr
    assert not Task.objects.exists()


def test_gpus_and_quota_list_as_tables_and_json(gpuctl):
    assert len(json.loads(gpuctl("gpus", "--json").stdout)) == 16
    assert gpuctl("gpus", "--state", "free").stdout.count("free") == 16
    quota = json.loads(gpuctl("quota", "--json").stdout)
    assert quota[0]["tenant"] == "acme"
    assert gpuctl("quota").stdout.splitlines()[1].split()[:2] == ["acme", "0/8"]
    assert gpuctl("submit", "--dry-run", "--gpus", "4", "--", "true").stdout.startswith("Would start now on gpu-0")
    assert not Task.objects.exists()


def test_the_live_web_process_registers_itself_in_the_cluster_view(gpuctl, live_daphne, alice):
    token = create_token(alice, "probe")[1]

    def web_alive() -> bool:
        req = urllib.request.Request(  # noqa: S310 (loopback)
            f"{live_daphne}/api/v1/cluster", headers={"Authorization": f"Token {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
            servers = json.loads(resp.read())["servers"]
        return any(s["role"] == "web" and s["alive"] for s in servers)

    _wait_for(web_alive)


# --- helpers ------------------------------------------------------------------------------

_seen: dict[int, str] = {}


def _read_available(proc: subprocess.Popen) -> str:
    import select

    buf = _seen.setdefault(proc.pid, "")
    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        buf += line
    _seen[proc.pid] = buf
    return buf


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_one_quoted_argument_is_a_shell_command_line_and_several_are_an_argv(gpuctl):
    shell = gpuctl("submit", "--", "echo a; sleep 1").stdout
    assert Task.objects.get(pk=int(shell)).command == "echo a; sleep 1"  # run by sh -c as written
    argv = gpuctl("submit", "--", "python", "my script.py", "a;b").stdout
    assert Task.objects.get(pk=int(argv)).command == "python 'my script.py' 'a;b'"  # each word as given


def test_url_and_token_work_before_the_subcommand_too(gpuctl, live_daphne, alice, tmp_path):
    token = create_token(alice, "front")[1]
    env = {**gpuctl.env, "GPUCTL_CONFIG": str(tmp_path / "none.json")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.gpuctl", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    before = run("--url", live_daphne, "--token", token, "quota", "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)[0]["tenant"] == "acme"
    after = run("quota", "--url", live_daphne, "--token", token, "--json")
    assert after.returncode == 0 and json.loads(after.stdout) == json.loads(before.stdout)
    # Given in both places, the one after the subcommand wins.
    mixed = run("--url", "http://127.0.0.1:9", "--token", token, "quota", "--url", live_daphne)
    assert mixed.returncode == 0, mixed.stderr


def test_logs_follow_opens_at_the_newest_lines_and_all_starts_from_the_first(gpuctl, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="f", command="x", status=TaskStatus.SUCCEEDED)
    text = "".join(f"{i}\n" for i in range(150))
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data=text)
    assert gpuctl("logs", "-f", str(task.pk)).stdout == "".join(f"{i}\n" for i in range(50, 150))
    assert gpuctl("logs", "-f", "--tail", "2", str(task.pk)).stdout == "148\n149\n"
    assert gpuctl("logs", "--all", str(task.pk)).stdout == text


def test_messages_follow_lang_and_the_portal_answers_in_the_same_language(gpuctl):
    zh = {**gpuctl.env, "LANG": "zh_CN.UTF-8", "LC_ALL": "", "LANGUAGE": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.gpuctl", *args], cwd=ROOT, env=zh, capture_output=True,
                              text=True, timeout=60)

    refused = run("submit", "--gpus", "9", "--", "true")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("gpuctl: error: gpu_count: 必须在 1 到 8 之间（单台服务器最多的 GPU 数），"  # noqa: RUF001
                                      "或是 8 的倍数、最多 16，以占用整台服务器（或给出 nodes 和 gpus_per_node）。")  # noqa: RUF001
    assert "没有这个任务" in run("show", "999999").stderr
    assert run("queue").stdout.split()[:3] == ["编号", "名称", "租户"]
