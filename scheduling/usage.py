"""The usage ledger: GPU-seconds and GPU-memory-seconds from allocation intervals.

Accounting rules (the README repeats them for operators)
--------------------------------------------------------
- Every allocation row is one interval ``[allocated_at, released_at)`` of one task on
  one GPU; a still-open one counts up to ``now``. A period ``[start, end)`` counts the
  part of each interval inside it, so an interval cut by a period boundary is split
  between the two periods to the second.
- An exclusive allocation is charged the whole GPU: 1 GPU-second per second. A shared
  allocation is charged the fraction of the GPU's memory it claims
  (``memory_mb / memory_total_mb``, at most 1), so the tasks sharing a GPU never add up
  to more than the GPU.
- GPU-memory-seconds are the memory the allocation claims (MB) times its seconds.
- A preempted or requeued task's earlier attempts are their own (released) intervals:
  they count, as the GPUs were held; the new attempt adds its own.
- Attribution: tenant and user (the submitter) and workload class of the task; server
  and GPU model of the GPU. A task whose submitter was deleted is counted with no user.
- Utilisation: agents' utilisation readings are sampled per GPU and UTC day
  (``GpuUtilisationDay``); allocated GPU-seconds are weighted by the mean utilisation of
  their GPU that day, so "allocated but idle" shows. Intervals on days with no sample
  are left out of the mean (``measured_gpu_seconds``).

How it stays fast over years of history
---------------------------------------
``roll_up()`` (every minute from the sweep schedule and ``runscheduler``) adds every
interval released after the watermark and at least ``ROLLUP_LAG`` ago into ``UsageDay``
rows (UTC day x tenant x user x GPU model x class) with one set-based INSERT ... SELECT
... ON CONFLICT, then moves the watermark, in one transaction. A report is one SQL
statement (one snapshot, so a concurrent roll-up can neither double-count nor drop an
interval) summing:

1. ``UsageDay`` rows of the whole UTC days inside the period;
2. raw intervals not rolled up yet (open, or released after the watermark: an index on
   ``released_at`` and the partial index on open allocations find them);
3. raw rolled-up intervals clipped to the partial first and last day of the period
   (none when the period starts and ends at midnight UTC, as monthly reports do).

The same roll-up counts the released intervals per GPU (``GpuAllocationCount``), so a GPU's
allocations ever (``/metrics``'s ``gpu_tasks_total``) are those counts plus its raw rows.

Grouping by server or task is not in the roll-up: those reports read the raw intervals
of the period (fine for a tenant's month, slower for a cluster's year).

The lag exists because ``released_at`` is stamped inside the releasing transaction: a
release that commits later than ``ROLLUP_LAG`` after its timestamp would be missed, and
a release transaction is milliseconds long.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db import connection, transaction
from django.utils import timezone

from nodes.models import Node, NodeStatus
from tenants.models import FairShare, Quota, Tenant

ROLLUP_NAME = "usage"
ROLLUP_LAG = timedelta(minutes=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# What a report can group by, and the subset the day roll-up keeps.
DIMENSIONS = ("tenant", "user", "server", "gpu_model", "workload_class", "task")
ROLLUP_DIMENSIONS = frozenset({"tenant", "user", "gpu_model", "workload_class"})

_PIECE_COLUMNS = {
    "tenant": "tenant_id",
    "user": "user_id",
    "server": "node_id",
    "gpu_model": "gpu_model",
    "workload_class": "workload_class",
    "task": "task_id",
}

# Shared allocations are charged their share of the GPU's memory, exclusive ones the GPU.
_FRACTION = ("CASE WHEN a.exclusive THEN 1.0 "
             "ELSE least(1.0, a.memory_mb::float8 / greatest(g.memory_total_mb, 1)) END")


@dataclass(frozen=True)
class UsageRow:
    """One group of a report; the keys not grouped by are None."""

    tenant: str | None
    user: str | None
    server: str | None
    gpu_model: str | None
    workload_class: str | None
    task: int | None
    gpu_seconds: float
    gpu_memory_mb_seconds: float
    utilization_pct: float | None  # mean utilisation over the measured GPU-seconds

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600.0

    @property
    def gpu_memory_gb_hours(self) -> float:
        return self.gpu_memory_mb_seconds / 1000.0 / 3600.0


class ReportError(ValueError):
    """Bad report arguments (the API turns this into a 400)."""


def _day_floor(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return datetime.combine(t.date(), time(), tzinfo=UTC)


def _day_ceil(t: datetime) -> datetime:
    floor = _day_floor(t)
    return floor if floor == t else floor + timedelta(days=1)


# --- the roll-up ------------------------------------------------------------------------

# Splits each interval released in (old, new] at UTC midnights and adds the pieces to the
# day rows. Pieces of zero length (an interval released exactly at midnight) are dropped.
_ROLLUP_SQL = f"""
INSERT INTO scheduling_usageday AS u
    (day, tenant_id, user_id, gpu_model, workload_class, gpu_seconds, gpu_memory_mb_seconds,
     measured_gpu_seconds, busy_gpu_seconds)
SELECT p.day, p.tenant_id, p.user_id, p.gpu_model, p.workload_class, sum(p.gs), sum(p.ms),
       coalesce(sum(p.gs) FILTER (WHERE ud.samples > 0), 0),
       coalesce(sum(p.gs * ud.utilization_sum / ud.samples / 100.0) FILTER (WHERE ud.samples > 0), 0)
FROM (
    SELECT d.day::date AS day, t.tenant_id, t.submitter_id AS user_id, g.model_name AS gpu_model,
           t.workload_class, a.gpu_id,
           s.secs * {_FRACTION} AS gs, s.secs * a.memory_mb AS ms
    FROM scheduling_allocation a
    JOIN scheduling_task t ON t.id = a.task_id
    JOIN nodes_gpu g ON g.id = a.gpu_id
    CROSS JOIN LATERAL generate_series(date_trunc('day', a.allocated_at, 'UTC'), a.released_at,
                                       interval '1 day') AS d(day)
    CROSS JOIN LATERAL (
        SELECT extract(epoch FROM least(a.released_at, d.day + interval '1 day')
                                  - greatest(a.allocated_at, d.day))::float8 AS secs
    ) s
    WHERE a.released_at > %(old)s AND a.released_at <= %(new)s AND s.secs > 0
) p
LEFT JOIN scheduling_gpuutilisationday ud ON ud.gpu_id = p.gpu_id AND ud.day = p.day
GROUP BY p.day, p.tenant_id, p.user_id, p.gpu_model, p.workload_class
ON CONFLICT ON CONSTRAINT usageday_unique_key DO UPDATE SET
    gpu_seconds = u.gpu_seconds + EXCLUDED.gpu_seconds,
    gpu_memory_mb_seconds = u.gpu_memory_mb_seconds + EXCLUDED.gpu_memory_mb_seconds,
    measured_gpu_seconds = u.measured_gpu_seconds + EXCLUDED.measured_gpu_seconds,
    busy_gpu_seconds = u.busy_gpu_seconds + EXCLUDED.busy_gpu_seconds
"""  # noqa: S608 (constants only)


# The same released intervals counted per GPU (GpuAllocationCount): /metrics's allocations
# per GPU read these and the rows after the watermark, never the whole history (a year of
# 200 servers, 10 million intervals: 14 s for count(DISTINCT task_id) GROUP BY gpu_id).
_COUNT_ROLLUP_SQL = """
INSERT INTO scheduling_gpuallocationcount AS c (gpu_id, allocations)
SELECT gpu_id, count(*) FROM scheduling_allocation
WHERE released_at > %(old)s AND released_at <= %(new)s
GROUP BY gpu_id
ON CONFLICT (gpu_id) DO UPDATE SET allocations = c.allocations + EXCLUDED.allocations
"""

# The roll-up's watermark (no row before the first roll-up), and as an expression that reads
# minus infinity then (everything is raw).
_ROLLUP_WATERMARK_SQL = f"SELECT watermark FROM scheduling_usagerollup WHERE name = '{ROLLUP_NAME}'"  # noqa: S608
_WATERMARK_SQL = f"coalesce(({_ROLLUP_WATERMARK_SQL}), '-infinity'::timestamptz)"

# The rolled-up counts and the raw rows after the watermark must come from one snapshot, or a
# roll-up committing in between would count its intervals twice or not at all: the statement
# returns the watermark it saw beside the counts, and is run again if that is not the one it
# was given. Given as a value, not read by a subquery: the planner then expects the few rows
# after it (as a subquery, a third of the table: a parallel scan and its JIT compilation,
# 60 ms instead of 3 over 10 million intervals).
_PER_GPU_SQL = f"""
SELECT x.gpu_id, sum(x.n)::bigint, ({_ROLLUP_WATERMARK_SQL}) FROM (
    SELECT gpu_id, allocations AS n FROM scheduling_gpuallocationcount
    UNION ALL
    SELECT gpu_id, count(*) FROM scheduling_allocation WHERE released_at IS NULL GROUP BY gpu_id
    UNION ALL
    SELECT gpu_id, count(*) FROM scheduling_allocation
    WHERE released_at > coalesce(%(watermark)s::timestamptz, '-infinity'::timestamptz)
    GROUP BY gpu_id
) x
GROUP BY x.gpu_id
"""  # noqa: S608 (constants only)


def allocations_per_gpu() -> dict[int, int]:
    """GPU id -> its allocations ever, open ones included. Each placement is one (a task placed
    on the same GPU again after a requeue counts again); GPUs never allocated are left out."""
    with connection.cursor() as cursor:
        cursor.execute(_ROLLUP_WATERMARK_SQL)
        row = cursor.fetchone()
        watermark = row[0] if row else None  # None: never rolled up, every interval is raw
        while True:
            cursor.execute(_PER_GPU_SQL, {"watermark": watermark})
            rows = cursor.fetchall()
            seen = rows[0][2] if rows else watermark
            if seen == watermark:
                return {gpu_id: n for gpu_id, n, _ in rows}
            watermark = seen  # a roll-up committed between the two reads


def roll_up(now: datetime | None = None) -> datetime:
    """Add intervals released up to ``now - ROLLUP_LAG`` to the day rows and the per-GPU
    counts; return the new watermark.

    Serialised by a row lock on the watermark row, so concurrent roll-ups (several
    schedulers, a django-q worker) never add an interval twice.
    """
    now = now or timezone.now()
    target = now - ROLLUP_LAG
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO scheduling_usagerollup (name, watermark) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            [ROLLUP_NAME, EPOCH],
        )
        cursor.execute("SELECT watermark FROM scheduling_usagerollup WHERE name = %s FOR UPDATE",
                       [ROLLUP_NAME])
        (old,) = cursor.fetchone()
        if target <= old:
            return old
        cursor.execute(_ROLLUP_SQL, {"old": old, "new": target})
        cursor.execute(_COUNT_ROLLUP_SQL, {"old": old, "new": target})
        cursor.execute("UPDATE scheduling_usagerollup SET watermark = %s, rolled_at = %s WHERE name = %s",
                       [target, now, ROLLUP_NAME])
    return target


_SAMPLE_SQL = f"""
INSERT INTO scheduling_gpuutilisationday AS u (gpu_id, day, samples, utilization_sum)
SELECT g.id, %(day)s, 1, g.utilization_pct
FROM nodes_gpu g JOIN nodes_node n ON n.id = g.node_id
WHERE n.status IN ('{NodeStatus.ACTIVE}', '{NodeStatus.DRAINING}') AND n.last_heartbeat_at > %(fresh)s
ON CONFLICT ON CONSTRAINT gpuutilisationday_unique DO UPDATE SET
    samples = u.samples + 1, utilization_sum = u.utilization_sum + EXCLUDED.utilization_sum
"""  # noqa: S608


def sample_utilisation(now: datetime | None = None, *, fresh_s: float = 120.0) -> int:
    """Add one utilisation sample per GPU whose server was heard from recently (stale
    readings of a silent server would claim a utilisation nobody measured)."""
    now = now or timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_SAMPLE_SQL, {"day": now.astimezone(UTC).date(), "fresh": now - timedelta(seconds=fresh_s)})
        return cursor.rowcount


# --- reports ----------------------------------------------------------------------------

def _raw_pieces(where: str, lo: str, hi: str, filters: str) -> str:
    """Intervals of allocations matching ``where``, clipped to [lo, hi) (SQL expressions)."""
    return f"""
    SELECT t.tenant_id, t.submitter_id AS user_id, a.node_id, g.model_name AS gpu_model, t.workload_class,
           a.task_id, s.secs * {_FRACTION} AS gs, s.secs * a.memory_mb AS ms,
           CASE WHEN ut.samples > 0 THEN s.secs * {_FRACTION} END AS measured,
           CASE WHEN ut.samples > 0 THEN s.secs * {_FRACTION} * ut.total / ut.samples / 100.0 END AS busy
    FROM params p
    CROSS JOIN scheduling_allocation a
    JOIN scheduling_task t ON t.id = a.task_id
    JOIN nodes_gpu g ON g.id = a.gpu_id
    CROSS JOIN LATERAL (
        SELECT greatest(a.allocated_at, {lo}) AS s0, least(coalesce(a.released_at, p.now), {hi}) AS s1
    ) b
    CROSS JOIN LATERAL (SELECT extract(epoch FROM b.s1 - b.s0)::float8 AS secs) s
    LEFT JOIN LATERAL (
        SELECT sum(samples) AS samples, sum(utilization_sum) AS total FROM scheduling_gpuutilisationday
        WHERE gpu_id = a.gpu_id AND day BETWEEN (b.s0 AT TIME ZONE 'UTC')::date AND (b.s1 AT TIME ZONE 'UTC')::date
    ) ut ON true
    WHERE {where} AND a.allocated_at < {hi} AND coalesce(a.released_at, p.now) > {lo}
      {filters}
    """  # noqa: S608 (fixed expressions and placeholders only)


def report(start: datetime, end: datetime, group_by: Sequence[str], *, tenant_ids: Iterable[int] | None = None,
           user_ids: Iterable[int] | None = None, now: datetime | None = None) -> list[UsageRow]:
    """Usage in ``[start, end)`` grouped by ``group_by`` (a subset of ``DIMENSIONS``).

    ``tenant_ids`` / ``user_ids`` restrict the report (the portal's scoping). Rows come
    largest GPU-seconds first. Aggregated in PostgreSQL: one statement.
    """
    group = list(dict.fromkeys(group_by))
    unknown = [g for g in group if g not in DIMENSIONS]
    if unknown:
        raise ReportError(f"unknown group_by {unknown[0]!r}: use {', '.join(DIMENSIONS)}")
    if start.tzinfo is None or end.tzinfo is None:
        raise ReportError("start and end need a time zone")
    if end <= start:
        raise ReportError("end must be after start")
    now = now or timezone.now()
    end_eff = min(end, now)
    params: dict[str, object] = {"lo": start, "hi": end, "now": now}

    filters = []
    day_filters = []
    if tenant_ids is not None:
        params["tenants"] = sorted(set(tenant_ids))
        filters.append("AND t.tenant_id = ANY(%(tenants)s)")
        day_filters.append("AND tenant_id = ANY(%(tenants)s)")
    if user_ids is not None:
        params["users"] = sorted(set(user_ids))
        filters.append("AND t.submitter_id = ANY(%(users)s)")
        day_filters.append("AND user_id = ANY(%(users)s)")
    filter_sql = " ".join(filters)

    parts: list[str] = []
    if set(group) <= ROLLUP_DIMENSIONS and start < end_eff:
        d_lo, d_hi = _day_ceil(start), _day_floor(end_eff)
        params["d_lo"], params["d_hi"] = d_lo, d_hi
        # 1. whole days from the roll-up (only days the watermark fully covers are complete
        #    there; the rest of those days' intervals come from 2.)
        if d_lo < d_hi:
            parts.append(f"""
            SELECT tenant_id, user_id, NULL::bigint AS node_id, gpu_model, workload_class, NULL::bigint AS task_id,
                   gpu_seconds AS gs, gpu_memory_mb_seconds AS ms, measured_gpu_seconds AS measured,
                   busy_gpu_seconds AS busy
            FROM scheduling_usageday
            WHERE day >= %(d_lo)s::date AND day < %(d_hi)s::date {' '.join(day_filters)}
            """)  # noqa: S608
            edges = []
            if start < d_lo:
                edges.append(("%(lo)s", "%(d_lo)s"))
            if d_hi < end:
                edges.append(("%(d_hi)s", "%(hi)s"))
        else:
            edges = [("%(lo)s", "%(hi)s")]
        # 2. not rolled up yet: open, or released after the watermark (two index scans).
        parts.append(_raw_pieces("a.released_at IS NULL", "%(lo)s", "%(hi)s", filter_sql))
        parts.append(_raw_pieces("a.released_at > p.watermark", "%(lo)s", "%(hi)s", filter_sql))
        # 3. rolled-up intervals on the partial days at the edges.
        for lo, hi in edges:
            parts.append(_raw_pieces(f"a.released_at <= p.watermark AND a.released_at > {lo}", lo, hi, filter_sql))
    else:
        parts.append(_raw_pieces("true", "%(lo)s", "%(hi)s", filter_sql))

    keys = [_PIECE_COLUMNS[g] for g in group]
    select_keys = ", ".join(f"x.{k}" for k in keys)
    union = "\nUNION ALL\n".join(parts)
    sql = f"""
    WITH params AS (
        SELECT %(now)s::timestamptz AS now,
               {_WATERMARK_SQL} AS watermark
    ), x AS ({union})
    SELECT {select_keys + ',' if keys else ''}
           sum(x.gs), sum(x.ms), sum(x.measured), sum(x.busy)
    FROM x
    {'GROUP BY ' + select_keys if keys else ''}
    HAVING sum(x.gs) > 0 OR sum(x.ms) > 0
    ORDER BY {len(keys) + 1} DESC
    """  # noqa: S608 (keys come from _PIECE_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return _label(group, rows)


def _label(group: list[str], rows: list[tuple]) -> list[UsageRow]:
    """Turn ids into names (tenant slug, username, server name) with one query per kind."""
    from django.contrib.auth import get_user_model


    idx = {g: i for i, g in enumerate(group)}
    names: dict[str, dict] = {}
    if "tenant" in idx:
        names["tenant"] = dict(Tenant.objects.filter(pk__in={r[idx["tenant"]] for r in rows})
                               .values_list("pk", "slug"))
    if "user" in idx:
        names["user"] = dict(get_user_model().objects.filter(pk__in={r[idx["user"]] for r in rows})
                             .values_list("pk", "username"))
    if "server" in idx:
        names["server"] = dict(Node.objects.filter(pk__in={r[idx["server"]] for r in rows})
                               .values_list("pk", "name"))
    out = []
    n = len(group)
    for r in rows:
        values: dict[str, object] = {}
        for g, i in idx.items():
            v = r[i]
            if g == "tenant":
                v = names["tenant"].get(v, f"#{v}")
            elif g == "user":
                v = "(no user)" if v is None else names["user"].get(v, f"(deleted user #{v})")
            elif g == "server":
                v = names["server"].get(v, f"#{v}")
            values[g] = v
        gs, ms, measured, busy = r[n:n + 4]
        util = round(100.0 * busy / measured, 1) if measured else None
        out.append(UsageRow(
            tenant=values.get("tenant"), user=values.get("user"), server=values.get("server"),
            gpu_model=values.get("gpu_model"), workload_class=values.get("workload_class"),
            task=values.get("task"), gpu_seconds=float(gs or 0), gpu_memory_mb_seconds=float(ms or 0),
            utilization_pct=util,
        ))
    return out


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first midnight UTC of the month, first of the next)."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    nxt = datetime(month.year + (month.month == 12), month.month % 12 + 1, 1, tzinfo=UTC)
    return start, nxt


def maintain(now: datetime | None = None) -> datetime:
    """The every-minute upkeep: sample utilisation, roll closed intervals up, refresh fair share."""
    now = now or timezone.now()
    sample_utilisation(now)
    watermark = roll_up(now)
    refresh_fair_share(now)
    return watermark


# --- fair share -------------------------------------------------------------------------

# Usage older than this many half-lives weighs under 1/1000: left out.
FAIR_SHARE_HORIZON_HALF_LIVES = 10

# Decayed GPU-seconds per tenant: day rows decay from their midday; intervals not rolled up
# yet get the exact integral of 2^(-age/H) over their seconds, H/ln2 * (2^(-age_end/H) - 2^(-age_start/H)).
_DECAYED_SQL = f"""
WITH params AS (
    SELECT %(now)s::timestamptz AS now, %(half_life_s)s::float8 AS h, %(since)s::timestamptz AS since,
           {_WATERMARK_SQL} AS watermark
), raw AS (
    SELECT a.id FROM params p CROSS JOIN scheduling_allocation a WHERE a.released_at IS NULL
    UNION ALL
    SELECT a.id FROM params p CROSS JOIN scheduling_allocation a
    WHERE a.released_at > p.watermark AND a.released_at > p.since
), pieces AS (
    SELECT u.tenant_id,
           u.gpu_seconds * power(2.0, -extract(epoch FROM p.now - (u.day + interval '12 hours')) / p.h) AS w
    FROM params p CROSS JOIN scheduling_usageday u
    WHERE u.day >= (p.since AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT t.tenant_id,
           {_FRACTION} * p.h / ln(2.0) * (power(2.0, -extract(epoch FROM p.now - b.s1) / p.h)
                                          - power(2.0, -extract(epoch FROM p.now - b.s0) / p.h))
    FROM params p CROSS JOIN raw
    JOIN scheduling_allocation a ON a.id = raw.id
    JOIN scheduling_task t ON t.id = a.task_id
    JOIN nodes_gpu g ON g.id = a.gpu_id
    CROSS JOIN LATERAL (
        SELECT greatest(a.allocated_at, p.since) AS s0, least(coalesce(a.released_at, p.now), p.now) AS s1
    ) b
    WHERE b.s1 > b.s0
)
SELECT tenant_id, sum(w) FROM pieces GROUP BY tenant_id
"""  # noqa: S608 (constants only)


def fair_share_factor(usage: float, share: float) -> float:
    """Slurm's classic 2^(-usage/share), both as fractions of the whole; in [0, 1]."""
    if usage <= 0:
        return 1.0
    if share <= 0:
        return 0.0
    return min(1.0, max(0.0, 2.0 ** (-usage / share)))


def refresh_fair_share(now: datetime | None = None, half_life_h: float | None = None) -> dict[int, float]:
    """Recompute every tenant's fair-share standing (``tenants.FairShare``); return tenant -> factor.

    Share: the quota's ``fair_share_weight``, else its ``max_gpus`` (a tenant without a quota
    row: the default max_gpus), over the sum of all tenants'. Usage: its decayed GPU-seconds
    over the sum of all tenants'.
    """
    from django.conf import settings


    now = now or timezone.now()
    half_life_s = (half_life_h or settings.SCHEDULER.fair_share_half_life_h) * 3600.0
    since = now - timedelta(seconds=half_life_s * FAIR_SHARE_HORIZON_HALF_LIVES)
    with connection.cursor() as cursor:
        cursor.execute(_DECAYED_SQL, {"now": now, "half_life_s": half_life_s, "since": since})
        decayed = {tid: float(w or 0.0) for tid, w in cursor.fetchall()}
    default_weight = Quota._meta.get_field("max_gpus").default
    weights = {
        tid: (weight if weight is not None else max_gpus) if max_gpus is not None else default_weight
        for tid, weight, max_gpus in Tenant.objects.values_list("id", "quota__fair_share_weight", "quota__max_gpus")
    }
    total_w = sum(weights.values()) or 1
    total_u = sum(max(0.0, decayed.get(tid, 0.0)) for tid in weights) or 1.0
    rows = []
    for tid, weight in weights.items():
        used = max(0.0, decayed.get(tid, 0.0))
        usage, share = used / total_u, weight / total_w
        rows.append(FairShare(tenant_id=tid, decayed_gpu_seconds=used, usage=usage, share=share,
                              factor=fair_share_factor(usage, share), computed_at=now))
    FairShare.objects.bulk_create(rows, update_conflicts=True, unique_fields=["tenant"],
                                  update_fields=["decayed_gpu_seconds", "usage", "share", "factor", "computed_at"])
    return {r.tenant_id: r.factor for r in rows}


def month_of(text: str | None, today: date) -> date:
    """'2026-10' -> date(2026, 10, 1); empty -> this month. ReportError on anything else."""
    if not text:
        return today.replace(day=1)
    try:
        year, month = (int(x) for x in text.split("-"))
        return date(year, month, 1)
    except (ValueError, TypeError):
        raise ReportError(f"bad month {text!r}: use YYYY-MM") from None


def add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def series(periods: list[tuple[datetime, datetime]], key: str, rows_for) -> dict:
    """GPU-hours per period per value of ``key``, for a stacked chart.

    ``rows_for(start, end)`` returns report rows grouped by ``key`` (already scoped to the
    viewer): one statement per period, each served by the roll-up.
    """
    values: dict[str, list[float]] = {}
    for i, (start, end) in enumerate(periods):
        for row in rows_for(start, end):
            name = str(getattr(row, key))
            values.setdefault(name, [0.0] * len(periods))[i] = round(row.gpu_hours, 2)
    return {"datasets": [{"label": k, "data": v} for k, v in sorted(values.items())]}
