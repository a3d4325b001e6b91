"""A live portal (daphne in a subprocess on the test database) and real agent
processes with simulated GPUs, for the agent's end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from kernel import live
from nodes.models import Node
from scheduling.models import Allocation, Task
from tests.conftest import free_port, subprocess_env, wait_for

ROOT = Path(__file__).resolve().parent.parent


def wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout, f"port {port}")


def start_portal(tmp: Path, *, heartbeat_interval_s: int = 1, heartbeat_timeout_s: int = 3,
                 port: int | None = None, extra_config: str = "") -> tuple[str, subprocess.Popen]:
    config = tmp / "portal.yaml"
    config.write_text(f"scheduler:\n  heartbeat_interval_s: {heartbeat_interval_s}\n"
                      f"  heartbeat_timeout_s: {heartbeat_timeout_s}\n{extra_config}")
    port = port or free_port()
    log = open(tmp / f"daphne-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT, env=subprocess_env(PORTAL_CONFIG=str(config), PORTAL_PROCESS_NAME="test-portal"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_for_port(port)
    return f"http://127.0.0.1:{port}", proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@dataclass
class Agents:
    tmp: Path
    join_token_file: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    # Tasks run as unprivileged accounts, which cannot enter pytest's 0700 tmp dirs: their
    # working directories live under /tmp (agents started as root map tasks to accounts).
    work_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="iso-agent-work-")))

    def work_dir(self, task: Task) -> Path:
        return self.work_root / f"{task.pk}-{task.attempt}"

    def start(self, name: str, portals: list[str], *extra: str, gpus: str = "8xH100-80GB",
              env: dict[str, str] | None = None) -> subprocess.Popen:
        state = self.tmp / "agents" / name
        # Each host holds its own copy of the join token, which its agent removes once spent.
        own_token = self.tmp / f"join-token-{name}"
        if not own_token.exists() and not (state / "node_token").exists():
            shutil.copyfile(self.join_token_file, own_token)
        log = open(self.tmp / f"agent-{name}.log", "ab")  # noqa: SIM115
        argv = [sys.executable, str(ROOT / "tests" / "agent_guard.py"), "--name", name, "--state-dir", str(state),
                "--simulate", gpus, "--join-token-file", str(own_token), "--grace-period", "2",
                "--kill-tasks-on-exit", "--work-root", str(self.work_root), *extra]
        for url in portals:
            argv += ["--portal", url]
        base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
        proc = subprocess.Popen(argv, cwd=ROOT, env={**base, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"agent-{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            stop(proc)
        shutil.rmtree(self.work_root, ignore_errors=True)


def server_ready(name: str, gpus: int = 8) -> Node:
    def ready():
        node = Node.objects.filter(name=name, status="active").first()
        return node if node and node.gpus.count() == gpus else None

    return wait_for(ready, 20, f"server {name} to enrol and heartbeat")


def assign(node: Node, tenant, command: str, gpus: list[int], **fields) -> Task:
    """What a scheduling pass does: an assigned task with its allocations, then the push."""
    with transaction.atomic():
        task = Task.objects.create(tenant=tenant, name=fields.pop("name", "job"), command=command,
                                   status="assigned", node=node, assigned_at=timezone.now(), **fields)
        for gpu in node.gpus.filter(index__in=gpus).order_by("index"):
            Allocation.objects.create(task=task, gpu=gpu, node=node, memory_mb=1_000)
        live.assignments_changed([node.pk])
    return task


def task_log(task: Task) -> str:
    return "".join(task.log_chunks.order_by("attempt", "offset").values_list("data", flat=True))


def task_processes(task_id: int, server: str) -> list[int]:
    """Pids of live processes started for a task (by the variables the agent sets)."""
    marker = f"TASK_ID={task_id}\0".encode()
    server_marker = f"GPU_SERVER={server}\0".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if marker in env and server_marker in env:
            pids.append(int(entry.name))
    return pids
