"""Runs tasks on the host: one process group per task, no containers.

Each task runs as its mapped Unix account (``accounts.AccountPolicy``), never as
the agent, with ``no_new_privs`` set and an environment made of its own ``env``
plus the portal's variables: nothing of the agent's leaks into it.

The agent keeps, under ``<state dir>/tasks/<id>-<attempt>/`` (the state dir is
0700, the agent's alone), ``meta.json`` (what was started, when, which pid, what
was reported) and the combined stdout/stderr in ``output.log`` (the task writes
it through the descriptor it inherits, never by path). The task itself gets a
working directory ``<work root>/<id>-<attempt>/``, owned by its account and 0700,
outside the state dir; a tiny ``sh`` wrapper running as the task's account
writes the command's exit code there (``.exit_code``), so it survives an agent
restart. The state directory is written *before* the process is spawned: a task
key (id, attempt) that has a directory is never started again, which is what
makes a repeated or replayed assignment harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nodes.agent.accounts import Account, AccountError, AccountPolicy, base_environment, set_no_new_privs

log = logging.getLogger("gpu-agent.runner")

# sh -c WRAPPER gpu-task <command> <exit file> <working dir>, as the task's account: enters
# the working directory with that account's rights (Popen's cwd= would enter it as root),
# runs the command in a child shell and records its exit status where a restarted agent
# can still read it.
WRAPPER = ('if cd -- "$3"; then sh -c "$1"; code=$?; else code=127; fi; '
           'echo "$code" > "$2.tmp" && mv -f -- "$2.tmp" "$2"; exit "$code"')
EXIT_FILE = ".exit_code"

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
    user: str = ""  # the submitting portal user, for the account mapping
    account: str = ""  # the Unix account it runs as
    work_dir: str = ""  # <work root>/<id>-<attempt>, owned by that account
    pid: int | None = None
    proc_start: str = ""  # /proc/<pid>/stat start time: tells our pid from a reused one
    started_at: float = 0.0  # agent wall clock, only for this task's own timeout and duration
    ended_at: float = 0.0
    state: str = "starting"  # starting, running, exited
    exit_code: int | None = None
    oom: bool = False
    timed_out: bool = False
    removed: bool = False  # the portal no longer wants it (cancelled, timed out, requeued)
    fenced: bool = False  # stopped because the agent's lease ran out: its copy may run elsewhere
    lost: bool = False
    reason: str = ""
    kill_sent_at: float = 0.0
    reported_started: bool = False
    reported_finished: bool = False
    shipped_offset: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return self.id, self.attempt

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
    def __init__(self, state_dir: Path, *, server_name: str, grace_s: float, work_root: Path,
                 accounts: AccountPolicy) -> None:
        self.root = state_dir / "tasks"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Task users may enter their own directory under it, but not list the others.
        self.work_root = work_root
        self.work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self.work_root, 0o711)  # noqa: S103 - traverse only: no one lists the others
        self.accounts = accounts
        self.server_name = server_name
        self.grace_s = grace_s
        self.tasks: dict[tuple[int, int], LocalTask] = {}
        self.children: dict[tuple[int, int], subprocess.Popen] = {}
        self.last_as_of: datetime | None = None

    # --- persistence ---------------------------------------------------------------
    def dir_of(self, task: LocalTask) -> Path:
        return self.root / f"{task.id}-{task.attempt}"

    def work_dir_of(self, task: LocalTask) -> Path:
        return self.work_root / f"{task.id}-{task.attempt}"

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
            if task.state == "exited":
                continue
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
        # The file lies in a directory the task's account owns: never follow a link it
        # made there, never block on a FIFO, read no more than an exit code needs.
        path = Path(task.work_dir) / EXIT_FILE if task.work_dir else self.dir_of(task) / "exit_code"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return int(os.read(fd, 32).decode("ascii").strip())
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

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
                self.kill(task, "the portal no longer assigns it (cancelled, timed out or requeued)")
        return started

    # --- processes -----------------------------------------------------------------
    def environment(self, task: LocalTask, account: Account) -> dict[str, str]:
        """The task's own env over a minimal base; the portal's variables win. Nothing
        comes from the agent's environment."""
        env = base_environment(account, task.work_dir)
        env.update({str(k): str(v) for k, v in task.env.items()})
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
        return env

    def start(self, spec: dict[str, Any], as_of: str) -> LocalTask:
        task = LocalTask(id=spec["id"], attempt=spec["attempt"], name=spec["name"], command=spec["command"],
                         env=spec.get("env") or {}, working_dir=spec.get("working_dir") or "",
                         timeout_s=spec["timeout_s"], tenant=spec["tenant"], gpu_indices=spec["gpu_indices"],
                         as_of=as_of, user=spec.get("user") or "")
        directory = self.dir_of(task)
        directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        self.tasks[task.key] = task
        self.save(task)  # before the spawn: never started twice, even across a crash
        task.started_at = time.time()
        try:
            account = self.accounts.resolve(task.user, task.tenant)
            task.account, task.work_dir = account.name, str(self.work_dir_of(task))
            self._make_work_dir(task, account)
            switch = {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)} \
                if self.accounts.switches_accounts else {}
            with open(self.log_path(task), "ab") as out:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", WRAPPER, "gpu-task", task.command, str(Path(task.work_dir) / EXIT_FILE),
                     task.working_dir or task.work_dir],
                    cwd="/", env=self.environment(task, account), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=set_no_new_privs, **switch,
                )
        except (OSError, AccountError, subprocess.SubprocessError) as exc:
            task.state, task.exit_code, task.ended_at = "exited", 127, time.time()
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            task.reason = f"could not start: {detail}"
            log.warning("task %s: %s", task.id, task.reason)
            self.save(task)
            return task
        self.children[task.key] = proc
        task.pid, task.proc_start, task.state = proc.pid, _proc_start(proc.pid), "running"
        self.save(task)
        log.info("task %s attempt %s: started pid %s as %s on GPUs %s", task.id, task.attempt, proc.pid,
                 task.account, task.gpu_indices)
        return task

    def _make_work_dir(self, task: LocalTask, account: Account) -> None:
        path = Path(task.work_dir)
        path.mkdir(mode=0o700)
        if self.accounts.switches_accounts:
            os.chown(path, account.uid, account.gid)

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
            if task.fenced:
                task.lost = True  # not the task's fault: reported as lost, so it is retried
            elif task.exit_code is None:
                task.lost = not (task.removed or task.timed_out)
                task.reason = task.reason or "the task's process ended without an exit status"
            task.state, task.ended_at = "exited", time.time()
            task.oom = self._saw_oom(task)
            self.save(task)
            log.info("task %s: exited with %s after %.1f s%s", task.id, task.exit_code,
                     task.ended_at - task.started_at, " (OOM)" if task.oom else "")
            ended.append(task)
        return ended

    def fence(self, reason: str) -> list[LocalTask]:
        """Stop every running task: the portal may have given them to another server.
        Returns the tasks told to stop (SIGTERM now, SIGKILL after the grace period)."""
        fenced = []
        for task in self.tasks.values():
            if task.state == "running" and not task.removed and not task.fenced:
                task.fenced = True
                task.reason = reason
                self.kill(task, reason)
                fenced.append(task)
        return fenced

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
                if task.work_dir:  # rmtree never follows the links a task may have left there
                    shutil.rmtree(task.work_dir, ignore_errors=True)
                self.tasks.pop(key)
