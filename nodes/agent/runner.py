"""Runs tasks on the host: one process group per task, no containers.

Each task gets a directory under ``<state dir>/tasks/<id>-<attempt>/`` holding
``meta.json`` (what was started, when, which pid, what was reported), the
combined stdout/stderr in ``output.log`` and, once the command ends, its exit
code in ``exit_code`` (written by a tiny ``sh`` wrapper, so it survives an agent
restart). The directory is written *before* the process is spawned: a task key
(id, attempt) that has a directory is never started again, which is what makes
a repeated or replayed assignment harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu-agent.runner")

# sh -c WRAPPER gpu-task <command> <exit file>: runs the command in a child shell and
# records its exit status where a restarted agent can still read it.
WRAPPER = 'sh -c "$1"; code=$?; echo "$code" > "$2.tmp" && mv "$2.tmp" "$2"; exit "$code"'

OOM_PATTERNS = re.compile(
    rb"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
    rb"cudaErrorMemoryAllocation"
)
MAX_CHUNK_BYTES = 60_000


@dataclass
class LocalTask:
    id: int
    attempt: int
    name: str
    command: str
    env: dict[str, str]
    working_dir: str
    timeout_s: int
    tenant: str
    gpu_indices: list[int]
    as_of: str  # portal time of the snapshot that started it
    pid: int | None = None
    proc_start: str = ""  # /proc/<pid>/stat start time: tells our pid from a reused one
    started_at: float = 0.0  # agent wall clock, only for this task's own timeout and duration
    ended_at: float = 0.0
    state: str = "starting"  # starting, barrier (a gang's rank waiting for the others), running, exited
    exit_code: int | None = None
    oom: bool = False
    timed_out: bool = False
    removed: bool = False  # the portal no longer wants it (cancelled, timed out, requeued)
    lost: bool = False
    reason: str = ""
    kill_sent_at: float = 0.0
    reported_started: bool = False
    reported_finished: bool = False
    shipped_offset: int = 0
    # "gang": the rank's part of the assignment (rank, nodes, gpus_per_node, master_addr/port);
    # "port": the port rank 0 offered; "ready_reported": the barrier report was acknowledged.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return self.id, self.attempt

    @property
    def gang(self) -> dict[str, Any] | None:
        return self.extra.get("gang")

    @property
    def done(self) -> bool:
        return self.state == "exited" and self.reported_finished


def _proc_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runner:
    def __init__(self, state_dir: Path, *, server_name: str, grace_s: float, address: str = "") -> None:
        self.root = state_dir / "tasks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.server_name = server_name
        # How other servers reach this one: a gang's MASTER_ADDR when this server is its rank 0.
        self.address = address or server_name
        self.grace_s = grace_s
        self.tasks: dict[tuple[int, int], LocalTask] = {}
        self.children: dict[tuple[int, int], subprocess.Popen] = {}
        self.last_as_of: datetime | None = None

    # --- persistence ---------------------------------------------------------------
    def dir_of(self, task: LocalTask) -> Path:
        return self.root / f"{task.id}-{task.attempt}"

    def log_path(self, task: LocalTask) -> Path:
        return self.dir_of(task) / "output.log"

    def save(self, task: LocalTask) -> None:
        path = self.dir_of(task) / "meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(task)))
        tmp.replace(path)

    def load(self) -> None:
        """Pick up the tasks of a previous run: reattach live ones, settle the rest."""
        for meta in sorted(self.root.glob("*/meta.json")):
            try:
                task = LocalTask(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable %s", meta)
                continue
            self.tasks[task.key] = task
            if task.state in ("exited", "barrier"):
                continue  # a rank at the barrier has no process yet: the portal still decides
            if task.pid and _proc_start(task.pid) == task.proc_start and task.proc_start:
                task.state = "running"
                log.info("task %s: reattached to pid %s", task.id, task.pid)
            else:
                self._settle_without_process(task)
            self.save(task)

    def _settle_without_process(self, task: LocalTask) -> None:
        code = self._read_exit_file(task)
        task.state, task.ended_at = "exited", task.ended_at or time.time()
        if code is None:
            task.lost = True
            task.reason = f"the agent on {self.server_name} restarted and the task's process was gone"
        else:
            task.exit_code = code
            task.oom = self._saw_oom(task)

    def _read_exit_file(self, task: LocalTask) -> int | None:
        try:
            return int((self.dir_of(task) / "exit_code").read_text().strip())
        except (OSError, ValueError):
            return None

    def _saw_oom(self, task: LocalTask) -> bool:
        tail = b""
        try:
            with open(self.log_path(task), "rb") as f:
                while block := f.read(1 << 20):
                    if OOM_PATTERNS.search(tail + block):
                        return True
                    tail = block[-64:]
        except OSError:
            pass
        return False

    # --- desired state -------------------------------------------------------------
    def reconcile(self, state: dict[str, Any]) -> list[LocalTask]:
        """Start what the portal wants and we never started; kill what it no longer
        wants. Returns the tasks started now."""
        as_of = datetime.fromisoformat(state["as_of"])
        if self.last_as_of is not None and as_of < self.last_as_of:
            return []  # an older snapshot overtaken by a newer one
        self.last_as_of = as_of
        wanted = {(t["id"], t["attempt"]): t for t in state["tasks"]}
        started = []
        for key, spec in wanted.items():
            if key in self.tasks:
                task = self.tasks[key]
                if task.state == "barrier" and (spec.get("gang") or {}).get("master_port"):
                    started.append(self._open_barrier(task, spec))
                continue
            if spec["status"] == "running":
                # Running on the portal, unknown here: our state was lost with its process.
                task = LocalTask(id=spec["id"], attempt=spec["attempt"], name=spec["name"], command="",
                                 env={}, working_dir="", timeout_s=spec["timeout_s"], tenant=spec["tenant"],
                                 gpu_indices=spec["gpu_indices"], as_of=state["as_of"], state="exited", lost=True,
                                 reported_started=True,
                                 reason=f"the agent on {self.server_name} has no record of this task")
                self.dir_of(task).mkdir(parents=True, exist_ok=True)
                self.tasks[key] = task
                self.save(task)
                continue
            started.append(self.start(spec, state["as_of"]))
        for key, task in self.tasks.items():
            if key in wanted or task.state == "exited" or task.removed:
                continue
            if datetime.fromisoformat(task.as_of) < as_of:
                task.removed = True
                if task.state == "barrier":
                    task.state, task.ended_at = "exited", time.time()
                    self.save(task)
                    continue
                self.kill(task, "the portal no longer assigns it (cancelled, timed out or requeued)")
        return started

    # --- processes -----------------------------------------------------------------
    def environment(self, task: LocalTask) -> dict[str, str]:
        env = {**os.environ, **{str(k): str(v) for k, v in task.env.items()}}
        env.update({
            # NVML numbers GPUs in PCI bus order; CUDA must use the same order.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in task.gpu_indices),
            "TASK_ID": str(task.id),
            "TASK_ATTEMPT": str(task.attempt),
            "TASK_NAME": task.name,
            "TENANT": task.tenant,
            "GPU_SERVER": self.server_name,
        })
        env.update(self.rank_environment(task))
        return env

    @staticmethod
    def rank_environment(task: LocalTask) -> dict[str, str]:
        """What torchrun (``--nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR ...``)
        and DeepSpeed expect of one server's process in a gang; nothing for a one-server task."""
        gang = task.gang
        if not gang:
            return {}
        per_node = str(gang["gpus_per_node"])
        return {
            "MASTER_ADDR": str(gang["master_addr"]),
            "MASTER_PORT": str(gang["master_port"]),
            "NNODES": str(gang["nodes"]),
            "NODE_RANK": str(gang["rank"]),
            "NPROC_PER_NODE": per_node,
            "LOCAL_WORLD_SIZE": per_node,
            "WORLD_SIZE": str(gang["nodes"] * gang["gpus_per_node"]),
            "PORTAL_TASK_ID": str(task.id),
        }

    def _open_barrier(self, task: LocalTask, spec: dict[str, Any]) -> LocalTask:
        """Every rank is ready: start this rank's process with the gang's master address."""
        task.extra["gang"] = spec["gang"]
        task.state = "starting"
        self.save(task)
        return self._spawn(task)

    @staticmethod
    def free_port() -> int:
        """A port free on this server now, for a gang's rendezvous (rank 0 offers it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def start(self, spec: dict[str, Any], as_of: str) -> LocalTask:
        task = LocalTask(id=spec["id"], attempt=spec["attempt"], name=spec["name"], command=spec["command"],
                         env=spec.get("env") or {}, working_dir=spec.get("working_dir") or "",
                         timeout_s=spec["timeout_s"], tenant=spec["tenant"], gpu_indices=spec["gpu_indices"],
                         as_of=as_of)
        gang = spec.get("gang")
        if gang:
            task.extra["gang"] = gang
            if not gang.get("master_port"):
                # A gang's rank waits at the barrier until the portal says every rank is ready.
                task.state = "barrier"
                if gang["rank"] == 0:
                    task.extra["port"] = self.free_port()
        directory = self.dir_of(task)
        directory.mkdir(parents=True, exist_ok=False)
        self.tasks[task.key] = task
        self.save(task)  # before the spawn: never started twice, even across a crash
        if task.state == "barrier":
            log.info("task %s attempt %s: rank %s waiting at the start barrier", task.id, task.attempt,
                     gang["rank"])
            return task
        return self._spawn(task)

    def _spawn(self, task: LocalTask) -> LocalTask:
        directory = self.dir_of(task)
        cwd = task.working_dir or str(directory)
        task.started_at = time.time()
        try:
            with open(self.log_path(task), "ab") as out:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", WRAPPER, "gpu-task", task.command, str(directory / "exit_code")],
                    cwd=cwd, env=self.environment(task), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
        except OSError as exc:
            task.state, task.exit_code, task.ended_at = "exited", 127, time.time()
            task.reason = f"could not start: {exc.strerror or exc} (working dir {cwd!r})"
            log.warning("task %s: %s", task.id, task.reason)
            self.save(task)
            return task
        self.children[task.key] = proc
        task.pid, task.proc_start, task.state = proc.pid, _proc_start(proc.pid), "running"
        self.save(task)
        log.info("task %s attempt %s: started pid %s on GPUs %s", task.id, task.attempt, proc.pid,
                 task.env.get("CUDA_VISIBLE_DEVICES") or task.gpu_indices)
        return task

    def kill(self, task: LocalTask, reason: str) -> None:
        if task.state != "running" or task.kill_sent_at:
            return
        log.info("task %s: SIGTERM to its process group (%s)", task.id, reason)
        task.kill_sent_at = time.time()
        task.reason = task.reason or reason
        self._signal(task, signal.SIGTERM)
        self.save(task)

    def _signal(self, task: LocalTask, sig: int) -> None:
        if task.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(task.pid, sig)

    def poll(self) -> list[LocalTask]:
        """Reap exits, enforce timeouts and kill grace periods. Returns tasks that ended now."""
        ended = []
        now = time.time()
        for key, task in list(self.tasks.items()):
            if task.state != "running":
                continue
            if not task.kill_sent_at and now - task.started_at > task.timeout_s:
                task.timed_out = True
                self.kill(task, f"exceeded its timeout of {task.timeout_s} s")
            if task.kill_sent_at and now - task.kill_sent_at > self.grace_s:
                self._signal(task, signal.SIGKILL)
            child = self.children.get(key)
            if child is not None:
                code = child.poll()
                if code is None:
                    continue
                self.children.pop(key)
            else:  # reattached after a restart: not our child, watch its pid
                if task.pid and _proc_start(task.pid) == task.proc_start:
                    continue
                code = None
            # The main process is gone: nothing of the task may outlive it.
            self._signal(task, signal.SIGKILL)
            file_code = self._read_exit_file(task)
            task.exit_code = file_code if file_code is not None else code
            if task.exit_code is None:
                task.lost = not (task.removed or task.timed_out)
                task.reason = task.reason or "the task's process ended without an exit status"
            task.state, task.ended_at = "exited", time.time()
            task.oom = self._saw_oom(task)
            self.save(task)
            log.info("task %s: exited with %s after %.1f s%s", task.id, task.exit_code,
                     task.ended_at - task.started_at, " (OOM)" if task.oom else "")
            ended.append(task)
        return ended

    def group_alive(self, task: LocalTask) -> bool:
        return bool(task.pid) and _group_alive(task.pid)

    def stop_all(self) -> None:
        """For --kill-tasks-on-exit: SIGTERM every group, SIGKILL after the grace period."""
        running = [t for t in self.tasks.values() if t.state == "running"]
        for task in running:
            self._signal(task, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(self.group_alive(t) for t in running):
            for key in list(self.children):
                self.children[key].poll()
            time.sleep(0.05)
        for task in running:
            self._signal(task, signal.SIGKILL)

    # --- logs ----------------------------------------------------------------------
    def next_log_chunk(self, task: LocalTask) -> tuple[int, str, int] | None:
        """(offset, text, bytes) of the next unshipped piece of the log, or None."""
        try:
            with open(self.log_path(task), "rb") as f:
                f.seek(task.shipped_offset)
                raw = f.read(MAX_CHUNK_BYTES)
        except OSError:
            return None
        if not raw:
            return None
        if task.state == "running" and len(raw) < MAX_CHUNK_BYTES:
            cut = raw.rfind(b"\n")
            if cut < 0:
                return None  # wait for the end of the line (or of the task)
            raw = raw[: cut + 1]
        else:
            while raw and len(raw) == MAX_CHUNK_BYTES and (raw[-1] & 0xC0) == 0x80:
                raw = raw[:-1]  # never split a UTF-8 character
        text = raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        return task.shipped_offset, text, len(raw)

    def prune(self, keep_s: float) -> None:
        now = time.time()
        for key, task in list(self.tasks.items()):
            if task.done and task.ended_at and now - task.ended_at > keep_s:
                shutil.rmtree(self.dir_of(task), ignore_errors=True)
                self.tasks.pop(key)
