"""Scheduler options: the seeds' defaults, optionally overridden by a YAML file.

``PORTAL_CONFIG=path/to/portal.yaml`` names the file; ``configs/portal.yaml`` is a
commented example. Every key is checked: an unknown key or a bad value raises
``ConfigError`` with one line that names the key, so ``manage.py`` can print it
and exit non-zero instead of running with a half-understood configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

PRIORITY_NAMES = ("LOW", "NORMAL", "HIGH", "CRITICAL")
WORKLOAD_CLASSES = ("online", "batch")
STRATEGIES = ("binpack", "spread")


class ConfigError(ImproperlyConfigured):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    poll_interval_ms: int = 100
    memory_safety_margin_mb: int = 2000
    max_models_per_gpu: int = 2
    heartbeat_interval_s: int = 10
    heartbeat_timeout_s: int = 30
    default_task_timeout_s: int = 3600
    max_task_timeout_s: int = 86400
    # GPUs kept out of scheduling, as UUIDs or "node-name:index".
    reserved_gpus: tuple[str, ...] = ()
    online_share: float = 0.7
    batch_share: float = 0.3
    # Strict split by default; when true a class may borrow the other's idle share,
    # and borrowed GPUs are the first to be reclaimed.
    allow_borrowing: bool = False
    strategy: str = "binpack"
    backfill: bool = True
    # Priorities allowed to preempt LOW batch tasks, e.g. ["CRITICAL"]. Empty: off.
    preemption: tuple[str, ...] = ()
    # Seconds an assigned task may wait for its agent to start it before it is requeued.
    assign_grace_s: int = 120
    default_max_retries: int = 2
    # Factor applied to a model's remembered memory estimate after an OOM.
    oom_memory_factor: float = 1.2
    # When more than this share of the servers (and at least two) fall silent at once,
    # the sweep reads it as a control-plane or network fault and declares no one lost.
    lost_guard_fraction: float = 0.5
    # An agent cut off from every portal URL this long stops its tasks by itself
    # (their copies may be running elsewhere by then). Well above the lost timeout.
    agent_lease_s: int = 900


_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "poll_interval_ms": (1, 60_000),
    "memory_safety_margin_mb": (0, 1_000_000),
    "max_models_per_gpu": (0, 64),
    "heartbeat_interval_s": (1, 3600),
    "heartbeat_timeout_s": (2, 86_400),
    "default_task_timeout_s": (1, 31_536_000),
    "max_task_timeout_s": (1, 31_536_000),
    "assign_grace_s": (1, 86_400),
    "default_max_retries": (0, 100),
    "agent_lease_s": (3, 604_800),
}


def _check(key: str, value: Any, expected: Any) -> Any:
    where = f"scheduler.{key}"
    if key in _INT_BOUNDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        lo, hi = _INT_BOUNDS[key]
        if not lo <= value <= hi:
            raise ConfigError(f"{where} must be between {lo} and {hi}, got {value}")
        return value
    if key in ("online_share", "batch_share"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{where} must be a number between 0 and 1, got {value!r}")
        return float(value)
    if key == "lost_guard_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"{where} must be a number above 0 and at most 1, got {value!r}")
        return float(value)
    if key == "oom_memory_factor":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise ConfigError(f"{where} must be a number between 1 and 10, got {value!r}")
        return float(value)
    if isinstance(expected, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if key == "strategy":
        if value not in STRATEGIES:
            raise ConfigError(f"{where} must be one of {', '.join(STRATEGIES)}, got {value!r}")
        return value
    if key == "reserved_gpus":
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where} must be a list of GPU UUIDs or 'node:index' strings")
        return tuple(value)
    if key == "preemption":
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of priorities, e.g. [CRITICAL]")
        names = tuple(str(v).upper() for v in value)
        for name in names:
            if name not in PRIORITY_NAMES or name == "LOW":
                raise ConfigError(f"{where} may list HIGH or CRITICAL (or NORMAL), got {name!r}")
        return names
    raise ConfigError(f"{where}: unsupported option")  # pragma: no cover - every field is handled


def build_config(data: dict[str, Any] | None) -> SchedulerConfig:
    """Validate a parsed YAML document and return the scheduler options."""
    if data is None:
        return SchedulerConfig()
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping with a 'scheduler' section")
    unknown = sorted(set(data) - {"scheduler"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r} (expected: scheduler)")
    section = data.get("scheduler") or {}
    if not isinstance(section, dict):
        raise ConfigError("'scheduler' must be a mapping of options")
    defaults = SchedulerConfig()
    known = {f.name: f for f in dataclasses.fields(SchedulerConfig)}
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"unknown key scheduler.{key!s} (see configs/portal.yaml for the options)")
        values[key] = _check(key, value, getattr(defaults, key))
    config = dataclasses.replace(defaults, **values)
    if config.online_share + config.batch_share > 1.0 + 1e-9:
        raise ConfigError(
            "scheduler.online_share + scheduler.batch_share must not exceed 1, "
            f"got {config.online_share} + {config.batch_share}"
        )
    if config.heartbeat_timeout_s <= config.heartbeat_interval_s:
        raise ConfigError("scheduler.heartbeat_timeout_s must be greater than scheduler.heartbeat_interval_s")
    if config.agent_lease_s <= config.heartbeat_timeout_s:
        raise ConfigError("scheduler.agent_lease_s must be greater than scheduler.heartbeat_timeout_s")
    if config.default_task_timeout_s > config.max_task_timeout_s:
        raise ConfigError("scheduler.default_task_timeout_s must not exceed scheduler.max_task_timeout_s")
    return config


def load_config(path: str | None) -> SchedulerConfig:
    """Read ``path`` (or return the defaults when it is empty)."""
    if not path:
        return SchedulerConfig()
    import yaml

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"PORTAL_CONFIG={path}: cannot read the file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"PORTAL_CONFIG={path}: not valid YAML{where}") from None
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"PORTAL_CONFIG={path}: {exc}") from None


__all__ = ["ConfigError", "SchedulerConfig", "build_config", "load_config"]
