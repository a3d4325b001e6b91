"""GPU scores: model affinity plus load balance, and picking the best GPUs of a server.

GPU score = model affinity (+100 when the task's model is loaded on it, +50 when its LRU
cache has room: fewer than ``max_models_per_gpu`` models) + the load-balance score (free
memory 40, utilisation 30, temperature 20, idle time 10, each normalised to 0..1; idle time
saturates at one hour). ``binpack`` inverts the free-memory term so that busy GPUs score
higher. The static part (utilisation, temperature, idle time) is computed once per pass; the
base part is recomputed by the working state whenever a GPU's memory changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from scheduling.placement.types import GpuState

# Idle time beyond this counts as fully idle in the load-balance score.
IDLE_SATURATION_S = 3600.0
AFFINITY_LOADED = 100.0
AFFINITY_ROOM = 50.0


def static_score(gpu: GpuState, now: datetime) -> float:
    """Utilisation, temperature and idle-time part of the load-balance score (0..60)."""
    util = min(max(gpu.utilization_pct, 0), 100) / 100.0
    temp = min(max(gpu.temperature_c, 0), 100) / 100.0
    idle = 0.0
    if gpu.idle_since is not None:
        idle = min(max((now - gpu.idle_since).total_seconds(), 0.0), IDLE_SATURATION_S) / IDLE_SATURATION_S
    return 30.0 * (1.0 - util) + 20.0 * (1.0 - temp) + 10.0 * idle


def base_score(total: int, claimed: int, live: int, static: float, binpack: bool) -> float:
    """Load-balance score of a GPU (0..100); binpack inverts the free-memory term."""
    used = claimed if claimed > live else live
    free_ratio = (total - used) / total if total > 0 else 0.0
    if free_ratio < 0:
        free_ratio = 0.0
    if binpack:
        free_ratio = 1.0 - free_ratio
    return 40.0 * free_ratio + static


def gpu_score(base: float, models: Iterable[str], model: str, max_models: int) -> float:
    """A GPU's score for a task running ``model`` ("" for none)."""
    if model:
        if model in models:
            return base + AFFINITY_LOADED
        if len(models) < max_models:  # type: ignore[arg-type]
            return base + AFFINITY_ROOM
    return base


def pick(base: Sequence[float], g_models: Sequence[Iterable[str]], max_models: int,
         q: list[int], c: int, model: str) -> tuple[float, tuple[int, ...]]:
    """The best ``c`` GPUs of ``q`` (all fit, in index order) and their summed score.

    Ties go to the lower index: ``max`` keeps the first maximum and the sorts are stable.
    The GPU columns come first so that a state can bind them once (``functools.partial``).
    """
    if model:
        # gpu_score inlined: this runs for every server compared for a task with a model.
        scores = {}
        for g in q:
            models = g_models[g]
            scores[g] = base[g] + (AFFINITY_LOADED if model in models
                                   else AFFINITY_ROOM if len(models) < max_models else 0.0)  # type: ignore[arg-type]
        key = scores.__getitem__
    else:
        key = base.__getitem__
    if len(q) == c:
        return sum(map(key, q)), tuple(q)
    if c == 1:
        g = max(q, key=key)
        return key(g), (g,)
    ranked = sorted(q, key=key, reverse=True)[:c]
    return sum(map(key, ranked)), tuple(sorted(ranked))
