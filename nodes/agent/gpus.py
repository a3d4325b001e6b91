"""GPU discovery and metrics through NVML (the nvidia-ml-py ``pynvml`` module).

``GPUReader`` is given the NVML module to use: the real ``pynvml`` on a GPU
server, or ``fake_nvml.FakeNVML`` with ``--simulate``; both go through exactly
this code. Every optional reading (ECC, retired pages, power, Xid events) is
skipped when the GPU answers NOT_SUPPORTED, as consumer and older cards do.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("gpu-agent.gpus")

MIB = 1024 * 1024


class SpecError(ValueError):
    """A bad --simulate value."""


class NoDriver(Exception):
    """NVML cannot be loaded or initialised: no NVIDIA driver on this host."""


def load_nvml(simulate: str | None, *, name: str, sim_dir: str) -> Any:
    if simulate:
        from nodes.agent.fake_nvml import FakeNVML

        return FakeNVML(simulate, server_name=name, switch_dir=sim_dir)
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GPUReader:
    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.handles: list[Any] = []
        self.driver_version = ""
        self.event_set: Any = None
        self._pending_xids: dict[int, list[int]] = {}

    def open(self) -> None:
        nv = self.nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise NoDriver(f"NVML could not be initialised ({exc}); is the NVIDIA driver installed?") from None
        self.driver_version = _text(self._opt(nv.nvmlSystemGetDriverVersion, default=""))
        self.handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        # Xid errors arrive as events; where the driver does not support them we
        # still have the ECC counters.
        try:
            self.event_set = nv.nvmlEventSetCreate()
            for handle in self.handles:
                self._opt(nv.nvmlDeviceRegisterEvents, handle, nv.nvmlEventTypeXidCriticalError, self.event_set)
        except nv.NVMLError:
            self.event_set = None

    def close(self) -> None:
        try:
            if self.event_set is not None:
                self.nvml.nvmlEventSetFree(self.event_set)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass

    def _opt(self, func, *args, default: Any = None) -> Any:
        try:
            return func(*args)
        except self.nvml.NVMLError:
            return default

    def _drain_xid_events(self) -> None:
        if self.event_set is None:
            return
        nv = self.nvml
        for _ in range(64):
            try:
                event = nv.nvmlEventSetWait_v2(self.event_set, 0)
            except nv.NVMLError:
                return  # NVML_ERROR_TIMEOUT: no more events
            for index, handle in enumerate(self.handles):
                if event.device == handle:
                    self._pending_xids.setdefault(index, []).append(int(event.eventData))

    def sample(self) -> list[dict[str, Any]]:
        """One reading of every GPU, in the agent API's heartbeat format."""
        nv = self.nvml
        self._drain_xid_events()
        gpus = []
        for index, h in enumerate(self.handles):
            memory = nv.nvmlDeviceGetMemoryInfo(h)
            util = self._opt(nv.nvmlDeviceGetUtilizationRates, h)
            power_mw = self._opt(nv.nvmlDeviceGetPowerUsage, h, default=0) or 0
            ecc = self._opt(nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                            nv.NVML_AGGREGATE_ECC, default=0) or 0
            retired = 0
            for cause in (nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                          nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR):
                retired += len(self._opt(nv.nvmlDeviceGetRetiredPages, h, cause, default=[]) or [])
            pending = self._opt(nv.nvmlDeviceGetRetiredPagesPendingStatus, h, default=0)
            processes = self._opt(nv.nvmlDeviceGetComputeRunningProcesses, h, default=[]) or []
            gpus.append({
                "index": index,
                "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                "name": _text(nv.nvmlDeviceGetName(h)),
                "memory_total_mb": int(memory.total // MIB),
                "memory_used_mb": int(memory.used // MIB),
                "utilization_pct": int(util.gpu) if util is not None else 0,
                "temperature_c": int(self._opt(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU, default=0)),
                "power_w": int(power_mw // 1000),
                "ecc_errors": int(ecc),
                "retired_pages": retired,
                "retired_pages_pending": bool(pending),
                "xid_errors": self._pending_xids.pop(index, []),
                "processes": [
                    {"pid": int(p.pid),
                     "used_memory_mb": int(p.usedGpuMemory // MIB) if p.usedGpuMemory is not None else None}
                    for p in processes
                ],
            })
        return gpus
