"""A simulated NVML for development and tests: ``--simulate 8xH100-80GB``.

``FakeNVML`` offers the pynvml functions ``gpus.GPUReader`` calls, with the
same return shapes and the same ``NVMLError`` classes and constants (taken from
pynvml itself), so the agent's real code path runs unchanged. Several simulated
servers can share one machine: UUIDs derive from the server name.

What a simulated GPU shows:
- its compute processes: the task processes this agent started on it (found in
  /proc by their ``GPU_SERVER`` and ``CUDA_VISIBLE_DEVICES`` variables);
- memory and utilisation rising while tasks run (memory grows with task age);
- an error on demand: write ``<switch dir>/ecc-<index>`` (content: the number of
  uncorrected ECC errors, default 1) or ``<switch dir>/xid-<index>`` (content:
  the Xid code, default 79; consumed once reported).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from nodes.agent.gpus import SpecError

MIB = 1024 * 1024

# name as NVML reports it, memory in MiB as NVML reports it
KNOWN_MODELS: dict[str, tuple[str, int]] = {
    "H100-80GB": ("NVIDIA H100 80GB HBM3", 81_559),
    "H200-141GB": ("NVIDIA H200", 143_771),
    "A100-80GB": ("NVIDIA A100-SXM4-80GB", 81_920),
    "A100-40GB": ("NVIDIA A100-SXM4-40GB", 40_960),
    "L40S-48GB": ("NVIDIA L40S", 46_068),
    "L4-24GB": ("NVIDIA L4", 23_034),
    "RTX4090-24GB": ("NVIDIA GeForce RTX 4090", 24_564),
}

SPEC_RE = re.compile(r"^(?P<count>\d{1,2})x(?P<model>[A-Za-z0-9]+)-(?P<mem>\d{1,4})GB$")


def parse_spec(spec: str) -> tuple[int, str, int]:
    """``8xH100-80GB`` -> (8, "NVIDIA H100 80GB HBM3", 81559)."""
    match = SPEC_RE.match(spec.strip())
    if not match:
        raise SpecError(f"--simulate {spec!r}: expected COUNTxMODEL-MEMGB, e.g. 8xH100-80GB")
    count, mem = int(match["count"]), int(match["mem"])
    if not 1 <= count <= 64 or mem < 1:
        raise SpecError(f"--simulate {spec!r}: 1 to 64 GPUs of at least 1 GB")
    key = f"{match['model'].upper()}-{mem}GB"
    name, mib = KNOWN_MODELS.get(key, (f"NVIDIA {match['model']} {mem}GB", mem * 1024))
    return count, name, mib


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


@dataclass
class _Event:
    device: Any
    eventType: int
    eventData: int


@dataclass(frozen=True)
class _Handle:
    index: int


def _task_processes(server: str) -> dict[int, list[tuple[int, str]]]:
    """GPU index -> [(pid, task id)] for this simulated server's task processes."""
    found: dict[int, list[tuple[int, str]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if f"GPU_SERVER={server}\0".encode() not in raw:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        for part in env.get("CUDA_VISIBLE_DEVICES", "").split(","):
            if part.strip().isdigit():
                found.setdefault(int(part), []).append((int(entry.name), env.get("TASK_ID", "")))
    return found


class FakeNVML:
    NVMLError = pynvml.NVMLError

    def __init__(self, spec: str, *, server_name: str, switch_dir: str) -> None:
        self.count, self.model, self.memory_mib = parse_spec(spec)
        self.server = server_name
        self.switch_dir = Path(switch_dir)
        self.initialised = False
        self._first_seen: dict[str, float] = {}
        self._scan: tuple[float, dict[int, list[tuple[int, str]]]] = (0.0, {})
        self._registered: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        # Constants and exception classes are pynvml's own; functions must be ours.
        if name.startswith(("NVML_", "NVMLError", "nvmlEventType")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNVML does not simulate {name}")

    # --- library (method names are pynvml's) ----------------------------------------
    def nvmlInit(self) -> None:
        self.switch_dir.mkdir(parents=True, exist_ok=True)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def _check(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.0-simulated"

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < self.count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    # --- identity ----------------------------------------------------------------------
    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{self.server}/{h.index}')}"

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        return self.model

    # --- load --------------------------------------------------------------------------
    def _tasks_on(self, h: _Handle) -> list[tuple[int, str]]:
        at, scan = self._scan
        if time.monotonic() - at > 0.5:
            scan = _task_processes(self.server)
            self._scan = (time.monotonic(), scan)
        # One entry per task: the lowest pid stands for the task's process tree.
        by_task: dict[str, int] = {}
        for pid, task in scan.get(h.index, []):
            by_task[task] = min(pid, by_task.get(task, pid))
        return [(pid, task) for task, pid in sorted(by_task.items())]

    def _task_memory_mib(self, task: str, tasks: int) -> int:
        started = self._first_seen.setdefault(f"{task}", time.monotonic())
        grown = 2048 + int(1024 * (time.monotonic() - started))
        return min(grown, int(self.memory_mib * 0.9) // max(tasks, 1))

    def nvmlDeviceGetMemoryInfo(self, h: _Handle) -> _Memory:
        tasks = self._tasks_on(h)
        used_mib = 512 + sum(self._task_memory_mib(t, len(tasks)) for _, t in tasks)
        used = min(used_mib, self.memory_mib) * MIB
        return _Memory(total=self.memory_mib * MIB, free=self.memory_mib * MIB - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> _Utilization:
        n = len(self._tasks_on(h))
        gpu = 0 if n == 0 else min(100, 60 + 15 * n + int(time.monotonic() * 7) % 10)
        return _Utilization(gpu=gpu, memory=gpu // 2)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        return 32 + self.nvmlDeviceGetUtilizationRates(h).gpu * 45 // 100

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        return (70 + self.nvmlDeviceGetUtilizationRates(h).gpu * 6) * 1000  # milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[_Process]:
        tasks = self._tasks_on(h)
        return [_Process(pid=pid, usedGpuMemory=self._task_memory_mib(t, len(tasks)) * MIB) for pid, t in tasks]

    # --- errors ------------------------------------------------------------------------
    def _switch(self, kind: str, h: _Handle) -> str | None:
        path = self.switch_dir / f"{kind}-{h.index}"
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def nvmlDeviceGetTotalEccErrors(self, h: _Handle, error_type: int, counter_type: int) -> int:
        value = self._switch("ecc", h)
        if value is None or error_type != pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return 0
        return int(value) if value.isdigit() else 1

    def nvmlDeviceGetRetiredPages(self, h: _Handle, cause: int) -> list[int]:
        errors = self.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, 1)
        if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR and errors:
            return [0x1000 * (i + 1) for i in range(errors)]
        return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: _Handle) -> int:
        return 1 if self._switch("ecc", h) is not None else 0

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlEventSetFree(self, event_set: object) -> None:
        pass

    def nvmlDeviceRegisterEvents(self, h: _Handle, types: int, event_set: object) -> None:
        self._registered.add(h.index)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> _Event:
        for index in sorted(self._registered):
            h = _Handle(index)
            value = self._switch("xid", h)
            if value is not None:
                (self.switch_dir / f"xid-{index}").unlink(missing_ok=True)
                return _Event(device=h, eventType=pynvml.nvmlEventTypeXidCriticalError,
                              eventData=int(value) if value.isdigit() else 79)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
