"""Downsampled history of each GPU's utilisation, memory and temperature and of each
tenant's GPUs in use, for the charts (admin GPU/server/cluster pages, dashboard, task page).

Three tiers in one table each (``kernel.models.GpuSample``/``TenantSample``):

==========  ===========================  ==========================
tier        bucket                       kept (settings)
==========  ===========================  ==========================
raw         ``HISTORY_SAMPLE_S`` (10 s)  ``HISTORY_RAW_DAYS`` (1)
per minute  60 s, averages of raw        ``HISTORY_MINUTE_DAYS`` (30)
per hour    3600 s, averages of minutes  ``HISTORY_HOUR_DAYS`` (365)
==========  ===========================  ==========================

Cost: nothing on the heartbeat path. ``record()`` runs from ``runscheduler`` every
``HISTORY_SAMPLE_S`` (and from the every-minute sweep as a safety net): one
``INSERT ... SELECT`` copies every live GPU's current row and one copies every tenant's
allocation count, set-based, with bucketed timestamps and ``ON CONFLICT DO NOTHING`` so
several schedulers sampling at once write each bucket once. Rollups (``INSERT ... SELECT
... GROUP BY date_bin(...) ON CONFLICT DO UPDATE`` over a short recent window) and the
retention ``DELETE`` run at most once a minute per process. Reads pick the coarsest
tier that still covers the range and re-bucket to at most ``MAX_POINTS`` points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from kernel.models import HistoryResolution as Tier
from nodes.models import NodeStatus

MAX_POINTS = 600
ROLLUP_EVERY_S = 60.0
EPOCH = "2000-01-01T00:00:00+00:00"


def _tier_bucket_s(tier: int) -> int:
    return {Tier.RAW: settings.HISTORY_SAMPLE_S, Tier.MINUTE: 60, Tier.HOUR: 3600}[tier]


def _tier_keep(tier: int) -> timedelta:
    days = {Tier.RAW: settings.HISTORY_RAW_DAYS, Tier.MINUTE: settings.HISTORY_MINUTE_DAYS,
            Tier.HOUR: settings.HISTORY_HOUR_DAYS}[tier]
    return timedelta(days=days)


def _bucket(now: datetime, seconds: int) -> datetime:
    stamp = now.timestamp()
    return datetime.fromtimestamp(stamp - stamp % seconds, tz=now.tzinfo or timezone.get_current_timezone())


_SAMPLE_GPUS = f"""
INSERT INTO portal_gpusample (gpu_id, resolution, at, utilization_pct, memory_used_mb, temperature_c)
SELECT g.id, 0, %(at)s, g.utilization_pct, g.memory_used_mb, g.temperature_c
FROM nodes_gpu g JOIN nodes_node n ON n.id = g.node_id
WHERE n.status IN ('{NodeStatus.ACTIVE}', '{NodeStatus.DRAINING}') AND n.last_heartbeat_at >= %(fresh)s
ON CONFLICT (gpu_id, resolution, at) DO NOTHING
"""  # noqa: S608
_SAMPLE_TENANTS = """
INSERT INTO portal_tenantsample (tenant_id, resolution, at, gpus_in_use, gpu_quota)
SELECT t.id, 0, %(at)s, COALESCE(u.n, 0), q.max_gpus
FROM tenants_tenant t
LEFT JOIN tenants_quota q ON q.tenant_id = t.id
LEFT JOIN (SELECT k.tenant_id, COUNT(DISTINCT a.gpu_id) AS n
           FROM scheduling_allocation a JOIN scheduling_task k ON k.id = a.task_id
           WHERE a.released_at IS NULL GROUP BY k.tenant_id) u ON u.tenant_id = t.id
ON CONFLICT (tenant_id, resolution, at) DO NOTHING
"""
_ROLLUP = {
    "gpu": """
INSERT INTO portal_gpusample (gpu_id, resolution, at, utilization_pct, memory_used_mb, temperature_c)
SELECT gpu_id, %(to)s, date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b,
       AVG(utilization_pct), AVG(memory_used_mb), AVG(temperature_c)
FROM portal_gpusample WHERE resolution = %(from)s AND at >= %(since)s AND at < %(until)s
GROUP BY gpu_id, b
ON CONFLICT (gpu_id, resolution, at) DO UPDATE SET utilization_pct = EXCLUDED.utilization_pct,
    memory_used_mb = EXCLUDED.memory_used_mb, temperature_c = EXCLUDED.temperature_c
""",
    "tenant": """
INSERT INTO portal_tenantsample (tenant_id, resolution, at, gpus_in_use, gpu_quota)
SELECT tenant_id, %(to)s, date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b,
       AVG(gpus_in_use), MAX(gpu_quota)
FROM portal_tenantsample WHERE resolution = %(from)s AND at >= %(since)s AND at < %(until)s
GROUP BY tenant_id, b
ON CONFLICT (tenant_id, resolution, at) DO UPDATE SET gpus_in_use = EXCLUDED.gpus_in_use,
    gpu_quota = EXCLUDED.gpu_quota
""",
}


def sample(now: datetime | None = None) -> int:
    """Copy every live GPU's and every tenant's current figures into the raw tier."""
    now = now or timezone.now()
    params = {"at": _bucket(now, settings.HISTORY_SAMPLE_S),
              "fresh": now - timedelta(seconds=settings.SCHEDULER.heartbeat_timeout_s)}
    with connection.cursor() as cursor:
        cursor.execute(_SAMPLE_GPUS, params)
        written = cursor.rowcount
        cursor.execute(_SAMPLE_TENANTS, params)
    return written


def roll_up(now: datetime | None = None) -> None:
    """Average recent raw buckets into minutes and recent minutes into hours (idempotent:
    a bucket is recomputed whole), then drop what each tier no longer keeps."""
    now = now or timezone.now()
    steps = [(Tier.RAW, Tier.MINUTE, timedelta(minutes=5)), (Tier.MINUTE, Tier.HOUR, timedelta(hours=2))]
    with connection.cursor() as cursor:
        for source, target, window in steps:
            step = _tier_bucket_s(target)
            until = _bucket(now, step) + timedelta(seconds=step)  # the current bucket too, partial
            params = {"to": int(target), "from": int(source), "step": step, "epoch": EPOCH,
                      "since": _bucket(now - window, step), "until": until}
            for sql in _ROLLUP.values():
                cursor.execute(sql, params)
        for tier in Tier:
            for table in ("portal_gpusample", "portal_tenantsample"):
                cursor.execute(f"DELETE FROM {table} WHERE resolution = %s AND at < %s",  # noqa: S608 (fixed names)
                               [int(tier), now - _tier_keep(tier)])


_last_rollup = 0.0


def record(now: datetime | None = None) -> int:
    """The periodic job: sample now; roll up and enforce retention at most once a minute."""
    global _last_rollup
    written = sample(now)
    if time.monotonic() - _last_rollup >= ROLLUP_EVERY_S:
        _last_rollup = time.monotonic()
        roll_up(now)
    return written


# --- reading ---------------------------------------------------------------------------

RANGES = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7),
          "30d": timedelta(days=30), "365d": timedelta(days=365)}
DEFAULT_RANGE = "24h"


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime
    tier: int
    step_s: int


def window(since: datetime, until: datetime, now: datetime | None = None) -> Window:
    """The finest tier that still holds ``since``, and a step that gives at most MAX_POINTS."""
    now = now or timezone.now()
    span = max((until - since).total_seconds(), 1)
    tier = next((t for t in Tier if since >= now - _tier_keep(t)), Tier.HOUR)
    step = max(_tier_bucket_s(tier), int(span // MAX_POINTS) + 1)
    base = _tier_bucket_s(tier)
    step = -(-step // base) * base  # a whole number of the tier's buckets
    return Window(since, until, int(tier), step)


def _series(sql: str, params: dict[str, Any]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def gpu_history(gpu_ids: list[int], w: Window) -> dict[int, dict[str, list[list[float]]]]:
    """Per GPU: ``{"utilization_pct": [[ms, v], ...], "memory_used_mb": ..., "temperature_c": ...}``."""
    rows = _series("""
        SELECT gpu_id, date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b,
               AVG(utilization_pct), AVG(memory_used_mb), AVG(temperature_c)
        FROM portal_gpusample
        WHERE gpu_id = ANY(%(ids)s) AND resolution = %(tier)s AND at >= %(since)s AND at <= %(until)s
        GROUP BY gpu_id, b ORDER BY gpu_id, b""",
                   {"ids": list(gpu_ids), "tier": w.tier, "since": w.since, "until": w.until, "step": w.step_s,
                    "epoch": EPOCH})
    out: dict[int, dict[str, list[list[float]]]] = {
        g: {"utilization_pct": [], "memory_used_mb": [], "temperature_c": []} for g in gpu_ids}
    for gpu_id, at, util, mem, temp in rows:
        series = out[gpu_id]
        series["utilization_pct"].append([_ms(at), round(util, 1)])
        series["memory_used_mb"].append([_ms(at), round(mem)])
        series["temperature_c"].append([_ms(at), round(temp, 1)])
    return out


def cluster_history(w: Window) -> dict[str, list[list[float]]]:
    """Average utilisation of the sampled GPUs and the GPUs in use by all tenants together."""
    util = _series("""
        SELECT date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b, AVG(utilization_pct)
        FROM portal_gpusample WHERE resolution = %(tier)s AND at >= %(since)s AND at <= %(until)s
        GROUP BY b ORDER BY b""", {"tier": w.tier, "since": w.since, "until": w.until, "step": w.step_s,
                                   "epoch": EPOCH})
    # Per bucket: the average of each sample time's total (a tenant's rows share their times).
    used = _series("""
        SELECT b, AVG(total) FROM (
            SELECT at, date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b, SUM(gpus_in_use) AS total
            FROM portal_tenantsample WHERE resolution = %(tier)s AND at >= %(since)s AND at <= %(until)s
            GROUP BY at) per_time
        GROUP BY b ORDER BY b""", {"tier": w.tier, "since": w.since, "until": w.until, "step": w.step_s,
                                   "epoch": EPOCH})
    return {"utilization_pct": [[_ms(b), round(v, 1)] for b, v in util],
            "gpus_in_use": [[_ms(b), round(v, 2)] for b, v in used]}


def tenant_history(tenant_id: int, w: Window) -> dict[str, list[list[float]]]:
    rows = _series("""
        SELECT date_bin(%(step)s * interval '1 second', at, %(epoch)s) AS b, AVG(gpus_in_use), MAX(gpu_quota)
        FROM portal_tenantsample
        WHERE tenant_id = %(tenant)s AND resolution = %(tier)s AND at >= %(since)s AND at <= %(until)s
        GROUP BY b ORDER BY b""", {"tenant": tenant_id, "tier": w.tier, "since": w.since, "until": w.until,
                                   "step": w.step_s, "epoch": EPOCH})
    return {"gpus_in_use": [[_ms(b), round(v, 2)] for b, v, _q in rows],
            "gpu_quota": [[_ms(b), q] for b, _v, q in rows if q is not None]}
