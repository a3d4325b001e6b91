"""Usage-ledger benchmark: monthly and yearly reports over >= 10 million allocation intervals,
and the scheduling pass with fair share on vs off at 1,600 GPUs.

    .venv/bin/python bench/usage.py [--quick] [--allocations N]

Uses DATABASE_URL's server (or the embedded PostgreSQL) but its own database,
``<name>_usage_bench``, dropped and recreated at start. The synthetic year is made by
set-based SQL (``generate_series``), not Python loops: 200 servers x 8 GPUs, 20 tenants
with 10 users each, 4-GPU tasks back to back on every GPU over the last 365 days (10 %
shared, a third online), the newest still running. Then ``scheduling.usage.roll_up`` rolls
the closed intervals into day rows (timed), and the reports are timed, grouped by tenant
and by user: the last full month, and the last 365 days up to now (which adds the raw
open edge: running allocations, those released after the watermark, today's part-day).

Raw ceiling printed beside them: one sequential aggregate over every interval (what a
report without the roll-up has to read at least). Then a whole ``/metrics`` collection over
the same history (``metrics_scrape_ms``; it reads counters and the roll-up, never the history). The pass figures (taken
first, on an empty database) build ``bench/scheduler.py``'s 1,600-GPU cluster and backlog,
give the tenants spread-out fair-share factors, and time passes from an empty cluster with
the policy off and on, alternately, keeping each one's fastest run. The history is loaded
with foreign-key triggers off and the intervals table unlogged (the bench's own database;
this speeds up writing them, not reading them).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

SERVERS = 200
TENANTS = 20
USERS_PER_TENANT = 10
GPUS_PER_TASK = 4


def bench_database_url() -> str:
    """Create (afresh) the bench database next to the configured one and return its URL."""
    import psycopg

    base = os.environ.get("DATABASE_URL")
    if not base:
        from portal import embedded_db

        base = embedded_db.ensure_running()
    parts = urlsplit(base)
    name = (parts.path.lstrip("/") or "postgres") + "_usage_bench"
    url = urlunsplit(parts._replace(path="/" + name))
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url


def copy_of_template(table: str, template_id: int, overrides: dict[str, str], source: str) -> str:
    """INSERT ... SELECT copying a template row, with ``overrides`` (column -> SQL over ``source``).

    Every other column comes from the template row, which the ORM created with all defaults:
    a column another change adds later still gets a valid value.
    """
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                       "ORDER BY ordinal_position", [table])
        columns = [c for (c,) in cursor.fetchall()]
    values = [overrides.get(c, f"tpl.{c}") for c in columns]
    return (f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} "  # noqa: S608 (bench constants)
            f"FROM {source} CROSS JOIN (SELECT * FROM {table} WHERE id = {int(template_id)}) tpl")


def build_history(allocations: int, now: datetime) -> dict:
    """The synthetic year; returns its shape."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from nodes.models import GPU, Node, NodeStatus
    from scheduling.models import Task
    from tenants.models import Quota, Tenant

    gpus = SERVERS * 8
    tenants = Tenant.objects.bulk_create(Tenant(name=f"Lab {i}", slug=f"lab{i}") for i in range(TENANTS))
    Quota.objects.bulk_create(Quota(tenant=t, max_gpus=gpus // 4) for t in tenants)
    users = get_user_model().objects.bulk_create(
        get_user_model()(username=f"u{i}") for i in range(TENANTS * USERS_PER_TENANT))
    nodes = Node.objects.bulk_create(Node(name=f"h-{i:04d}", status=NodeStatus.ACTIVE) for i in range(SERVERS))
    models = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
    GPU.objects.bulk_create(GPU(node=n, index=j, uuid=f"GPU-{n.name}-{j}", model_name=models[k % 2],
                                memory_total_mb=81_559) for k, n in enumerate(nodes) for j in range(8))
    template = Task.objects.create(tenant=tenants[0], name="template", command="python train.py")

    tasks = allocations // GPUS_PER_TASK
    per_gpu = allocations // gpus  # back-to-back intervals on each GPU over the year
    slot_s = 365 * 86400 / per_gpu
    tenant0, user0, node0 = tenants[0].pk, users[0].pk, nodes[0].pk
    gpu0 = GPU.objects.order_by("id").values_list("id", flat=True).first()
    start = now - timedelta(days=365)
    # Task j holds GPUs 4j..4j+3 (mod 1600) in slot j // 400 of those GPUs; it runs for
    # 20-95 % of the slot; the last slot is still running.
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        # A bulk load into the bench's own database: foreign-key and audit triggers off for it
        # (the rows are consistent by construction), as pg_restore would do.
        cursor.execute("SET session_replication_role = replica")
        # ...and no WAL for the intervals table: this changes how fast it is written, not read.
        cursor.execute("ALTER TABLE scheduling_allocation SET UNLOGGED")
        cursor.execute(copy_of_template("scheduling_task", template.pk, {
            "id": f"{template.pk} + 1 + j",
            "tenant_id": f"{tenant0} + j %% {TENANTS}",
            "submitter_id": f"{user0} + (j %% {TENANTS}) * {USERS_PER_TENANT} + (j / {TENANTS}) %% {USERS_PER_TENANT}",
            "name": "'job'",
            "gpu_count": str(GPUS_PER_TASK),
            "gpu_memory_mb": "CASE WHEN j %% 10 = 0 THEN 20000 ELSE 40000 END",
            "share_mode": "CASE WHEN j %% 10 = 0 THEN 'shared' ELSE 'exclusive' END",
            "workload_class": "CASE WHEN j %% 3 = 0 THEN 'online' ELSE 'batch' END",
            "status": f"CASE WHEN j / {gpus // GPUS_PER_TASK} = {per_gpu - 1} THEN 'running' ELSE 'succeeded' END",
            "created_at": f"%(start)s::timestamptz + (j / {gpus // GPUS_PER_TASK}) * %(slot)s * interval '1 second'",
        }, f"generate_series(0::bigint, {tasks - 1}) AS j"), {"start": start, "slot": slot_s})
        task_s = time.perf_counter() - t0
        cursor.execute(f"""
            INSERT INTO scheduling_allocation
                (task_id, gpu_id, node_id, memory_mb, exclusive, allocated_at, released_at)
            SELECT {template.pk} + 1 + i / {GPUS_PER_TASK}, {gpu0} + i %% {gpus}, {node0} + (i %% {gpus}) / 8,
                   CASE WHEN (i / {GPUS_PER_TASK}) %% 10 = 0 THEN 20000 ELSE 40000 END,
                   (i / {GPUS_PER_TASK}) %% 10 <> 0,
                   s.t0,
                   CASE WHEN i / {gpus} = {per_gpu - 1} THEN NULL
                        ELSE s.t0 + (0.2 + 0.75 * ((i / {GPUS_PER_TASK}) * 7919 %% 1000) / 1000.0)
                                    * %(slot)s * interval '1 second' END
            FROM generate_series(0::bigint, {per_gpu * gpus - 1}) AS i
            CROSS JOIN LATERAL (SELECT %(start)s::timestamptz + (i / {gpus}) * %(slot)s * interval '1 second' AS t0) s
        """, {"start": start, "slot": slot_s})  # noqa: S608 (bench constants)
        alloc_s = time.perf_counter() - t0 - task_s
        cursor.execute("SET session_replication_role = DEFAULT")
        cursor.execute("ANALYZE")
    return {"tasks": tasks, "allocations": per_gpu * gpus, "gpus": gpus, "task_s": task_s, "alloc_s": alloc_s}


def timed(fn, runs: int) -> float:
    """Median wall time of ``runs`` calls, in ms."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def report_figures(now: datetime, runs: int) -> dict:
    from django.db import connection

    from scheduling import usage

    this_month = now.date().replace(day=1)
    month = usage.month_bounds(usage.add_months(this_month, -1))
    year = (datetime.combine((now - timedelta(days=365)).date(), datetime.min.time(), tzinfo=UTC), now)
    out = {}
    for label, (lo, hi) in (("month", month), ("year", year)):
        for key in ("tenant", "user"):
            rows = usage.report(lo, hi, [key], now=now)  # warm the cache once
            out[f"{label}_{key}_ms"] = timed(lambda lo=lo, hi=hi, key=key: usage.report(lo, hi, [key], now=now), runs)
            out[f"{label}_{key}_rows"] = len(rows)
            out[f"{label}_gpu_hours"] = round(sum(r.gpu_hours for r in rows))

    def raw_scan():
        with connection.cursor() as cursor:
            cursor.execute("SELECT sum(extract(epoch FROM coalesce(released_at, now()) - allocated_at)) "
                           "FROM scheduling_allocation")
            cursor.fetchone()

    out["raw_scan_ms"] = timed(raw_scan, runs)
    # A whole /metrics collection over the same history: its per-GPU task counts come from the
    # roll-up and the rows after it (scheduling.usage.allocations_per_gpu), not from a scan.
    from portal.metrics import collect_families

    collect_families()
    out["metrics_scrape_ms"] = timed(collect_families, runs)
    return out


def pass_figures(runs: int) -> dict:
    """bench/scheduler.py's 1,600-GPU cluster: passes from empty with fair share off, then on."""
    from django.conf import settings
    from django.db import connection

    from bench.scheduler import build, throughput

    build(SERVERS)
    with connection.cursor() as cursor:
        # Spread-out factors, as a busy month would leave them (refresh_fair_share writes the same table).
        cursor.execute("INSERT INTO tenants_fairshare (tenant_id, decayed_gpu_seconds, usage, share, factor, "
                       "computed_at) SELECT id, 0, 0, 0, ((id * 37) % 100) / 100.0, now() FROM tenants_tenant")
    base = settings.SCHEDULER
    # Alternate off/on so drift on a shared machine hits both alike, and keep each one's fastest
    # run: the same pass repeated, the minimum filters out time other processes stole.
    off, on = [], []
    for _ in range(runs):
        settings.SCHEDULER = dataclasses.replace(base, fair_share=False)
        off.append(throughput(1))
        settings.SCHEDULER = dataclasses.replace(base, fair_share=True)
        on.append(throughput(1))
    settings.SCHEDULER = base
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE scheduling_task, scheduling_allocation, scheduling_taskevent, nodes_gpu, nodes_node, "
                       "tenants_quota, tenants_tenant, django_q_ormq CASCADE")
    return {"pass_ms_fair_share_off": min(t["pass_ms"] for t in off),
            "pass_ms_fair_share_on": min(t["pass_ms"] for t in on),
            "core_ms_fair_share_off": min(t["core_ms"] for t in off),
            "core_ms_fair_share_on": min(t["core_ms"] for t in on),
            "placements_off": off[0]["placements"], "placements_on": on[0]["placements"]}


def core_figures(runs: int) -> dict:
    """The placement core alone on bench/core.py's 1,600-GPU snapshot, fair share off vs on (no
    database, fastest of ``runs``): the steadier comparison on a shared machine."""
    import random

    from bench.core import build_snapshot
    from scheduling.placement import schedule

    snap = build_snapshot(SERVERS, 8, 3000, seed=1)
    rnd = random.Random(3)
    for t in snap.tenants.values():
        t.fair_share = rnd.random()
    out = {}
    for on in (False, True):
        s = dataclasses.replace(snap, config=dataclasses.replace(snap.config, fair_share=on))
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            schedule(s)
            samples.append(time.perf_counter() - t0)
        out["on" if on else "off"] = min(samples) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under 3 minutes)")
    parser.add_argument("--allocations", type=int, default=10_000_000, help="allocation intervals (default 10 M)")
    args = parser.parse_args()

    db_url = bench_database_url()
    os.environ["DATABASE_URL"] = db_url
    os.environ.setdefault("Q_SYNC", "false")
    import django

    django.setup()
    import logging

    from django.core.management import call_command
    from django.db import connection

    from scheduling import usage

    logging.getLogger("django-q").setLevel(logging.WARNING)
    logging.getLogger("channels_postgres").setLevel(logging.ERROR)
    call_command("migrate", verbosity=0)

    runs = 3 if args.quick else 7
    p = pass_figures(5 if args.quick else 9)
    overhead = (p["pass_ms_fair_share_on"] / p["pass_ms_fair_share_off"] - 1) * 100
    print(f"pass from empty at 1,600 GPUs (fastest of the runs): fair share off {p['pass_ms_fair_share_off']:.1f} ms "
          f"(core {p['core_ms_fair_share_off']:.1f} ms, {p['placements_off']} placed), "
          f"on {p['pass_ms_fair_share_on']:.1f} ms (core {p['core_ms_fair_share_on']:.1f} ms, "
          f"{p['placements_on']} placed): {overhead:+.1f} %", flush=True)

    c = core_figures(7)
    print(f"placement core alone, 1,600 GPUs and 3,000 pending (fastest of 7): fair share off {c['off']:.1f} ms, "
          f"on {c['on']:.1f} ms ({(c['on'] / c['off'] - 1) * 100:+.1f} %)", flush=True)

    now = datetime.now(UTC)
    shape = build_history(args.allocations, now)
    print(f"history: {shape['allocations']:,} allocation intervals of {shape['tasks']:,} tasks on "
          f"{shape['gpus']:,} GPUs over 365 days (tasks {shape['task_s']:.0f} s, intervals {shape['alloc_s']:.0f} s "
          f"of set-based SQL)", flush=True)
    t0 = time.perf_counter()
    usage.roll_up(now)
    rollup_s = time.perf_counter() - t0
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE scheduling_usageday")
        cursor.execute("SELECT count(*) FROM scheduling_usageday")
        (day_rows,) = cursor.fetchone()
    print(f"roll-up of the closed intervals: {rollup_s:.1f} s -> {day_rows:,} day rows", flush=True)

    r = report_figures(now, runs)
    print(f"raw ceiling: one sequential aggregate over all {shape['allocations']:,} intervals: "
          f"{r['raw_scan_ms']:.0f} ms", flush=True)
    for label in ("month", "year"):
        print(f"report, {label}: by tenant {r[f'{label}_tenant_ms']:.0f} ms ({r[f'{label}_tenant_rows']} rows), "
              f"by user {r[f'{label}_user_ms']:.0f} ms ({r[f'{label}_user_rows']} rows); "
              f"{r[f'{label}_gpu_hours']:,} GPU-hours", flush=True)
    print(f"/metrics collection over the same history: {r['metrics_scrape_ms']:.0f} ms "
          f"(x{r['metrics_scrape_ms'] / r['raw_scan_ms']:.3f} of the raw scan)", flush=True)

    print(json.dumps({
        "usage_month_ms": round(max(r["month_tenant_ms"], r["month_user_ms"]), 1),
        "usage_year_ms": round(max(r["year_tenant_ms"], r["year_user_ms"]), 1),
        "allocations": shape["allocations"],
        "pass_ms_fair_share_on": round(p["pass_ms_fair_share_on"], 1),
        "pass_ms_fair_share_off": round(p["pass_ms_fair_share_off"], 1),
        "core_ms_fair_share_on": round(c["on"], 1),
        "core_ms_fair_share_off": round(c["off"], 1),
        "raw_scan_ms": round(r["raw_scan_ms"], 1),
        "metrics_scrape_ms": round(r["metrics_scrape_ms"], 1),
        "metrics_scrape_ms_ratio": round(r["metrics_scrape_ms"] / r["raw_scan_ms"], 4),
        "rollup_s": round(rollup_s, 1),
        "usage_day_rows": day_rows,
    }))


if __name__ == "__main__":
    main()
