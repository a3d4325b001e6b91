"""``SchedulerConfig``: the scheduler's options, and their checking from a parsed mapping.

Pure (stdlib only), so the placement core can carry its own options. Reading the YAML file
named by ``PORTAL_CONFIG`` stays with the project (``portal.config.load_config``), which
hands the parsed ``scheduler`` section to ``parse_config`` and turns a ``ConfigError`` here
into its own (a Django ``ImproperlyConfigured``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PRIORITY_NAMES = ("LOW", "NORMAL", "HIGH", "CRITICAL")
WORKLOAD_CLASSES = ("online", "batch")
STRATEGIES = ("binpack", "spread")


class ConfigError(ValueError):
    """One line naming the option and what is wrong with it."""


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
    # Fair share: within a priority level, tenants that used less than their share of the
    # cluster go first (factor 2^(-usage/share) from usage decayed with this half-life).
    fair_share: bool = False
    fair_share_half_life_h: float = 168.0
    # Gangs across servers: seconds from assignment for every rank to be ready and started
    # (the start barrier); past it the whole gang is stopped and requeued.
    gang_start_timeout_s: int = 120
    # Model affinity: a GPU's remembered model stays in its cache this long after last use.
    model_cache_ttl_seconds: int = 3600
    # A task whose dependency can no longer be satisfied is cancelled (Slurm's kill_invalid_depend);
    # false keeps it pending with that reason.
    cancel_invalid_dependents: bool = True
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
    "gang_start_timeout_s": (1, 86_400),
    "model_cache_ttl_seconds": (1, 31_536_000),
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
    if key == "fair_share_half_life_h":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 8760:
            raise ConfigError(f"{where} must be a number of hours between 1 and 8760, got {value!r}")
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


def parse_config(section: Mapping[str, Any]) -> SchedulerConfig:
    """Check every option of a parsed ``scheduler`` section and return the options
    (the defaults for those it leaves out); raises ``ConfigError`` naming the first bad key."""
    defaults = SchedulerConfig()
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
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
