"""GPU scores: model affinity plus load balance, and picking the best GPUs of a server.

GPU score = model affinity (+100 when the task's model is loaded on it, +50 when its LRU
cache has room: fewer than ``max_models_per_gpu`` models) + the load-balance score (free
memory 40, utilisation 30, temperature 20, idle time 10, each normalised to 0..1; idle time
counts in whole minutes and saturates at one hour). ``binpack`` inverts the free-memory term
so that busy GPUs score higher. The static part (utilisation, temperature, idle time) is
computed once per pass; the base part is recomputed by the working state whenever a GPU's
memory changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from scheduling.placement.types import GpuState

# Idle time beyond this counts as fully idle in the load-balance score.
IDLE_SATURATION_S = 3600.0
# Idle time counts in whole steps of this length. A score that moved with every tick of the
# clock could not be kept between passes: a server with a GPU idle for less than the saturation
# would have its columns rebuilt by every pass, which in a cluster with any churn is nearly all
# of them (``static_score_steady``; a lone task's pass at 1,000 servers spent most of its time there).
IDLE_STEP_S = 60.0
_STEPS = int(IDLE_SATURATION_S // IDLE_STEP_S)
_STEP = timedelta(seconds=IDLE_STEP_S)
_SATURATED = _STEPS * _STEP
_ZERO = timedelta(0)
AFFINITY_LOADED = 100.0
AFFINITY_ROOM = 50.0


def static_score_steady(gpu: GpuState, now: datetime) -> tuple[float, datetime | None, datetime | None]:
    """``(score, lo, hi)``: the utilisation, temperature and idle-time part of the load-balance
    score (0..60), and the clock times between which it is what it is at ``now``
    (``lo <= t < hi``, None for an open end). A GPU that is busy, or idle past the saturation,
    has a score the clock no longer moves. One function, so that the idle steps are counted
    once: the working state needs both for every GPU of every server it builds columns for."""
    # This runs for every GPU of every server a pass builds columns for. Clamping by
    # conditionals rather than min and max, and the saturated GPU (the usual idle one) answered
    # without the clock arithmetic of the steps: 1,600 GPUs idle past the saturation in 0.9 ms
    # against 6.4 ms, with the very same values.
    util = gpu.utilization_pct
    temp = gpu.temperature_c
    score = (30.0 * (1.0 - (0.0 if util <= 0 else 1.0 if util >= 100 else util / 100.0))
             + 20.0 * (1.0 - (0.0 if temp <= 0 else 1.0 if temp >= 100 else temp / 100.0)))
    since = gpu.idle_since
    if since is None:
        return score, None, None
    idle = now - since
    if idle >= _SATURATED:  # its score stays what it is from here on
        return score + 10.0, since + _SATURATED, None
    # Whole idle steps, 0 (a clock behind idle_since) to the saturation.
    k = 0 if idle <= _ZERO else idle // _STEP
    return (score + 10.0 * k / _STEPS,
            None if k == 0 else since + k * _STEP,
            since + (k + 1) * _STEP)


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
