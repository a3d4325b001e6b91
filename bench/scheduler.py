"""Scheduler benchmark: passes against a synthetic cluster in a real PostgreSQL.

    .venv/bin/python bench/scheduler.py [--quick]

Uses DATABASE_URL's server (or the embedded PostgreSQL) but its own database,
``<name>_bench``, dropped and recreated at start. For each cluster size
(200 x 8 = 1,600 GPUs; without --quick also 1,000 x 8 = 8,000 GPUs) it builds
servers, eight tenants and a backlog of 1.25 pending tasks per GPU (1/2/4/8 GPUs,
four priorities, online and batch, a fifth of them shared), then measures:

- placements/s end to end: one pass from an empty cluster (lock, load, core,
  write, commit) divided into the placements it made; median of several runs
  (5 with --quick), after one pass that is not counted (it also writes the
  waiting tasks' first reasons; see ``throughput``);
- core decision time per task (median, p99 µs) from ``core.schedule_timed``;
- pass duration, from empty, when the cluster is full (nothing placeable), and when one
  task enters or leaves the full cluster's queue ahead of most of it (every position behind
  it moves, and the pass stores each waiting task's position: ``queue_shift_pass_ms``);
- submit-to-allocated latency for one task on an idle cluster, through a real
  ``manage.py runscheduler`` process woken by NOTIFY (p50, p99).

Beside them, the raw ceilings measured in the same run, and the ratios to them
(keys ending ``_ratio``): the same placements the pass made, written by three
set-based statements (tasks, allocations, events: every constraint in place) and
one commit; and a commit + NOTIFY answered by a listener's committed row
(``bench.ceilings``), the floor under submit -> allocated.

The 1,600-GPU case runs again with about 2% of the queue turned into 16- and 32-GPU gangs
(2 or 4 whole servers each): placements/s and decision time must stay within 10% of the
gang-free figures; ``gang_decision_us_median`` is the gang tasks' own decision time.

The last line printed is one JSON object with the figures of the 1,600-GPU case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")


def bench_database_url() -> str:
    """Create (afresh) the bench database next to the configured one and return its URL."""
    import psycopg

    base = os.environ.get("DATABASE_URL")
    if not base:
        from portal import embedded_db

        base = embedded_db.ensure_running()
    parts = urlsplit(base)
    name = (parts.path.lstrip("/") or "postgres") + "_bench"
    url = urlunsplit(parts._replace(path="/" + name))
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def build(servers: int, seed: int = 1, gang_fraction: float = 0.0) -> int:
    """A fresh cluster of ``servers`` x 8 GPUs and 1.25 pending tasks per GPU. Returns the task count."""
    from django.db import connection
    from django.utils import timezone

    from nodes.models import GPU, Node, NodeStatus
    from scheduling.choices import ShareMode
    from scheduling.models import Task
    from tenants.choices import WorkloadClass
    from tenants.models import Quota, Tenant

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE scheduling_task, scheduling_allocation, scheduling_taskevent, nodes_gpu, nodes_node, "
                       "tenants_quota, tenants_tenant, django_q_ormq CASCADE")
    rng = random.Random(seed)
    gpus = servers * 8
    tenants = Tenant.objects.bulk_create(Tenant(name=f"Lab {i}", slug=f"lab{i}") for i in range(8))
    Quota.objects.bulk_create(
        Quota(tenant=t, max_gpus=gpus, max_gpu_memory_mb=gpus * 81_559, max_running_tasks=gpus,
              max_pending_tasks=gpus * 2) for t in tenants
    )
    nodes = Node.objects.bulk_create(
        Node(name=f"b-{i:04d}", hostname=f"b-{i:04d}.local", status=NodeStatus.ACTIVE,
             labels={"zone": "a" if i % 2 else "b"}) for i in range(servers)
    )
    GPU.objects.bulk_create(
        GPU(node=n, index=j, uuid=f"GPU-{n.name}-{j}", model_name="NVIDIA H100 80GB HBM3", memory_total_mb=81_559)
        for n in nodes for j in range(8)
    )
    count = int(gpus * 1.25)
    start = timezone.now() - timedelta(hours=1)
    tasks = []
    for i in range(count):
        shared = rng.random() < 0.2
        size = 1 if shared else rng.choices((1, 2, 4, 8), weights=(55, 25, 12, 8))[0]
        tasks.append(Task(
            tenant=rng.choice(tenants), name=f"job-{i}", command="python train.py", gpu_count=size,
            gpu_memory_mb=rng.choice((8_000, 12_000, 16_000, 24_000) if shared else (20_000, 40_000, 70_000)),
            share_mode=ShareMode.SHARED if shared else ShareMode.EXCLUSIVE, priority=rng.randrange(4),
            workload_class=WorkloadClass.ONLINE if rng.random() < 0.6 else WorkloadClass.BATCH,
            timeout_s=rng.choice((600, 3600, 7200)), created_at=start + timedelta(milliseconds=i),
        ))
    if gang_fraction:
        # Its own random stream: the rest of the queue is exactly the gang-free one.
        grng = random.Random(seed + 7)
        for task in tasks:
            if grng.random() < gang_fraction:
                task.gpu_count = grng.choice((16, 16, 32))
                task.nodes = task.gpu_count // 8
                task.gpu_memory_mb, task.share_mode = 70_000, ShareMode.EXCLUSIVE
    Task.objects.bulk_create(tasks, batch_size=2000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return count


def reset_to_pending() -> None:
    """Undo every placement so the next pass starts from an empty cluster with the same queue."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM scheduling_allocation")
        cursor.execute("DELETE FROM scheduling_taskrank")
        cursor.execute("DELETE FROM scheduling_taskevent")
        cursor.execute("UPDATE scheduling_task SET status = 'pending', node_id = NULL, assigned_at = NULL, "
                       "pending_reason = '', queue_position = NULL WHERE status <> 'pending'")
        cursor.execute("UPDATE nodes_gpu SET idle_since = now() - interval '1 hour'")
        # Every table the pass writes, as the first run found them: without it each run's pass
        # also steps over the dead rows of the runs before (the exclusion constraint's check
        # visits each deleted [t, inf) interval of its GPU), ~9% of the pass by the third run.
        cursor.execute("VACUUM ANALYZE scheduling_task, scheduling_allocation, scheduling_taskevent, "
                       "scheduling_taskrank")


def timed_schedule(sink: list[float], gang_sink: list[float] | None = None):
    from scheduling import placement

    def schedule(snapshot):
        if hasattr(placement, "schedule_timed"):
            plan, timings = placement.schedule_timed(snapshot)
            sink.extend(timings)
            if gang_sink is not None:
                order = placement.queue_order(snapshot.pending)
                gang_sink.extend(t for t, task in zip(timings, order, strict=True) if task.nodes > 1)
            return plan
        t0 = time.perf_counter()
        plan = placement.schedule(snapshot)
        if snapshot.pending:
            sink.extend([(time.perf_counter() - t0) / len(snapshot.pending)] * len(snapshot.pending))
        return plan

    return schedule


def throughput(runs: int) -> dict:
    from scheduling.passes import run_pass

    rates, durations, cores, placed, full_durations, notifies, shift_durations = [], [], [], [], [], [], []
    decisions: list[float] = []
    gang_decisions: list[float] = []
    # One pass first, not counted: build() stores the queue without reasons, so the first pass
    # also writes the reason and position of each of the ~1,200 tasks it leaves waiting (about
    # 20 ms of PostgreSQL's CPU: 76-80 ms against 55-63 ms at 1,600 GPUs), which every later
    # pass finds unchanged. The counted passes then write placements alone, as the raw ceiling
    # does. Its duration is reported as first_pass_ms.
    reset_to_pending()
    first = run_pass(actor="bench")
    for _ in range(runs):
        # The pass as runscheduler runs it: timing each decision (and finding the gangs among
        # them) adds its own cost, about 4% of the pass at 1,600 GPUs (alternating, 8 of each:
        # median 106.9 ms plain against 111.3 ms timed).
        reset_to_pending()
        result = run_pass(actor="bench")
        rates.append(result.placements / result.duration_s)
        durations.append(result.duration_s)
        cores.append(result.core_s)
        placed.append(result.placements)
        notifies.append(result.notify_s)
        # The same queue again on the now full cluster: the cost of a pass that places nothing.
        again = run_pass(actor="bench")
        full_durations.append(again.duration_s)
        shift_durations.extend(queue_shift_passes())
        # The decision times, from the same pass run again with each decision timed.
        reset_to_pending()
        run_pass(actor="bench", schedule=timed_schedule(decisions, gang_decisions))
    return {
        "first_pass_ms": first.duration_s * 1000,
        "placements": int(statistics.median(placed)),
        "placements_per_s": statistics.median(rates),
        "pass_ms": statistics.median(durations) * 1000,
        "core_ms": statistics.median(cores) * 1000,
        "full_pass_ms": statistics.median(full_durations) * 1000,
        "queue_shift_pass_ms": statistics.median(shift_durations) * 1000,
        "notify_ms": statistics.median(notifies) * 1000,
        "decision_us_median": statistics.median(decisions) * 1e6,
        "decision_us_p99": percentile(decisions, 99) * 1e6,
        "gang_decision_us_median": statistics.median(gang_decisions) * 1e6 if gang_decisions else 0.0,
    }


def queue_shift_passes(cycles: int = 3) -> list[float]:
    """Passes on the full cluster after one task enters the queue ahead of most of it, and after
    it leaves again, ``cycles`` times. None places anything, but each moves the position of every
    task behind that one, and the pass stores every waiting task's position. Several cycles: the
    first rewrites find the room VACUUM left in the task table's pages (reset_to_pending), later
    ones the pages as a busy queue leaves them between autovacuums."""
    from scheduling.models import Task
    from scheduling.passes import run_pass
    from tenants.models import Tenant

    tenant = Tenant.objects.order_by("pk").first()
    durations = []
    for _ in range(cycles):
        # Highest priority: it goes ahead of every task of priority 0-2 (about three quarters of
        # the queue). A GPU model no server has keeps it waiting whatever the cluster's state,
        # and no preemption could make room for it.
        head = Task.objects.create(tenant=tenant, name="queue-shift", command="true", gpu_count=8,
                                   gpu_memory_mb=70_000, gpu_model="B999", priority=3, timeout_s=600)
        entered = run_pass(actor="bench")
        Task.objects.filter(pk=head.pk).delete()
        left = run_pass(actor="bench")
        assert not (entered.placements or left.placements or entered.preemptions or left.preemptions), \
            "the queue-shift passes are meant to place and preempt nothing"
        durations += [entered.duration_s, left.duration_s]
    return durations


def raw_bulk_placements(runs: int) -> float:
    """Placements/s when the placements the last pass made are written by plain set-based SQL.

    Same tables, same constraints (the exclusion constraint included), same rows; no
    snapshot, no core, no ORM. Leaves the cluster as the pass left it.
    """
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("SELECT task_id, gpu_id, node_id, memory_mb, exclusive FROM scheduling_allocation "
                       "WHERE released_at IS NULL ORDER BY id")
        allocations = cursor.fetchall()
        cursor.execute("SELECT id, node_id FROM scheduling_task WHERE status = 'assigned' ORDER BY id")
        tasks = cursor.fetchall()
    columns = [list(c) for c in zip(*allocations, strict=True)]
    task_ids, node_ids = [t for t, _ in tasks], [n for _, n in tasks]
    rates = []
    for _ in range(runs):
        reset_to_pending()
        t0 = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE scheduling_task AS t SET status = 'assigned', node_id = v.node_id, "
                           "assigned_at = now(), pending_reason = '' "
                           "FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, node_id) WHERE t.id = v.id",
                           [task_ids, node_ids])
            cursor.execute("INSERT INTO scheduling_allocation (task_id, gpu_id, node_id, memory_mb, exclusive, "
                           "allocated_at) SELECT *, now() FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], "
                           "%s::int[], %s::bool[])", columns)
            cursor.execute("INSERT INTO scheduling_taskevent (task_id, from_status, to_status, actor, reason, "
                           "created_at) SELECT id, 'pending', 'assigned', 'bench', 'raw', now() "
                           "FROM unnest(%s::bigint[]) AS id", [task_ids])
        rates.append(len(task_ids) / (time.perf_counter() - t0))
    return statistics.median(rates)


def latency(samples: int, db_url: str) -> dict:
    """Submit one task at a time to an idle cluster; time until its allocation is committed."""
    import psycopg
    from django.db import connection, transaction

    from kernel.models import ControlPlaneServer
    from scheduling import triggers
    from scheduling.models import Task
    from tenants.models import Tenant

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM scheduling_allocation")
        cursor.execute("DELETE FROM scheduling_taskevent")
        cursor.execute("DELETE FROM scheduling_task")
        cursor.execute("ANALYZE")
    tenant = Tenant.objects.order_by("pk").first()
    env = {**os.environ, "DATABASE_URL": db_url, "Q_SYNC": "false", "PORTAL_PROCESS_NAME": "bench-scheduler",
           "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "manage.py", "runscheduler", "--sweep-interval-s", "5"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not ControlPlaneServer.objects.filter(pid=proc.pid, role="scheduler").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("runscheduler did not start")
            time.sleep(0.1)
        time.sleep(0.5)  # let its catch-up pass finish before the first sample
        with psycopg.connect(db_url, autocommit=True) as watcher:
            for i in range(samples):
                t0 = time.perf_counter()
                with transaction.atomic():
                    task = Task.objects.create(tenant=tenant, name=f"probe-{i}", command="true",
                                               gpu_memory_mb=20_000)
                    triggers.request_pass(f"task {task.pk} submitted")
                while not watcher.execute("SELECT 1 FROM scheduling_allocation WHERE task_id = %s",
                                          [task.pk]).fetchone():
                    if time.perf_counter() - t0 > 10:
                        raise SystemExit(f"task {task.pk} was not placed within 10 s")
                    # Poll every 2 ms: adds at most 2 ms to a sample, and tighter polling would
                    # steal CPU from the scheduler and PostgreSQL on a small machine.
                    time.sleep(0.002)
                results.append(time.perf_counter() - t0)
                # Back to idle: the task ends (as if its agent reported it done).
                watcher.execute("UPDATE scheduling_allocation SET released_at = now() WHERE task_id = %s", [task.pk])
                watcher.execute("UPDATE scheduling_task SET status = 'succeeded' WHERE id = %s", [task.pk])
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"p50_ms": percentile(results, 50) * 1000, "p99_ms": percentile(results, 99) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 1,600-GPU case (under 3 minutes)")
    args = parser.parse_args()

    db_url = bench_database_url()
    os.environ["DATABASE_URL"] = db_url
    os.environ.setdefault("Q_SYNC", "false")
    import django

    django.setup()
    import logging

    from django.core.management import call_command

    from bench import ceilings

    logging.getLogger("django-q").setLevel(logging.WARNING)
    logging.getLogger("channels_postgres").setLevel(logging.ERROR)  # "group does not exist": nobody listens here

    call_command("migrate", verbosity=0)

    sizes = (200,) if args.quick else (200, 1000)
    runs = 5 if args.quick else 7
    samples = 100 if args.quick else 200
    figures: dict[int, dict] = {}
    gang_figures: dict = {}
    for servers in sizes:
        gpus = servers * 8
        tasks = build(servers)
        print(f"== {gpus} GPUs on {servers} servers, {tasks} pending tasks", flush=True)
        t = throughput(runs)
        print(f"pass from empty: {t['placements']} placements in {t['pass_ms']:.1f} ms "
              f"(core {t['core_ms']:.1f} ms; the first pass, which also wrote the waiting tasks' reasons, not counted: "
              f"{t['first_pass_ms']:.1f} ms)"
              f" = {t['placements_per_s']:,.0f} placements/s; "
              f"then {t['notify_ms']:.1f} ms of after-commit pushes to agents/websockets", flush=True)
        print(f"pass on a full cluster ({tasks - t['placements']} left pending): {t['full_pass_ms']:.1f} ms; "
              f"when one task enters or leaves ahead of most of them: {t['queue_shift_pass_ms']:.1f} ms", flush=True)
        raw = raw_bulk_placements(runs)
        t["raw_bulk_placements_per_s"] = raw
        print(f"raw ceiling: the same placements by three set-based statements = {raw:,.0f} placements/s "
              f"(the pass at {t['placements_per_s'] / raw:.1%} of it)", flush=True)
        print(f"core decision per task: median {t['decision_us_median']:.1f} us, p99 {t['decision_us_p99']:.1f} us",
              flush=True)
        lat = latency(samples, db_url)
        print(f"submit-to-allocated through runscheduler ({samples} samples): p50 {lat['p50_ms']:.1f} ms, "
              f"p99 {lat['p99_ms']:.1f} ms", flush=True)
        raw_lat = ceilings.notify_round_trip_ms(db_url, 50)
        print(f"raw ceiling: commit + NOTIFY -> listener's committed answer, p50 {raw_lat['p50_ms']} ms, "
              f"p99 {raw_lat['p99_ms']} ms", flush=True)
        figures[gpus] = {**t, **lat, "raw_p50_ms": raw_lat["p50_ms"], "raw_p99_ms": raw_lat["p99_ms"]}
        if gpus == 1600:
            build(servers, gang_fraction=0.02)
            g = throughput(runs)
            print(f"same queue with ~2% gangs of 16/32 GPUs: {g['placements']} placements, "
                  f"{g['placements_per_s']:,.0f} placements/s (x{g['placements_per_s'] / t['placements_per_s']:.2f}),"
                  f" decision median {g['decision_us_median']:.1f} us "
                  f"(x{g['decision_us_median'] / t['decision_us_median']:.2f}), gang tasks' median "
                  f"{g['gang_decision_us_median']:.1f} us", flush=True)
            gang_figures = g

    if len(figures) > 1:
        small, big = figures[1600], figures[8000]
        print(f"growth 1,600 -> 8,000 GPUs (x5): pass from empty x{big['pass_ms'] / small['pass_ms']:.2f}, "
              f"full-cluster pass x{big['full_pass_ms'] / small['full_pass_ms']:.2f}, "
              f"decision median x{big['decision_us_median'] / small['decision_us_median']:.2f}, "
              f"latency p50 x{big['p50_ms'] / small['p50_ms']:.2f}", flush=True)
    f = figures[1600]
    out = {
        "placements_per_s": round(f["placements_per_s"]),
        "decision_us_median": round(f["decision_us_median"], 1),
        "decision_us_p99": round(f["decision_us_p99"], 1),
        "submit_to_allocated_ms_p50": round(f["p50_ms"], 1),
        "submit_to_allocated_ms_p99": round(f["p99_ms"], 1),
        "gpus": 1600,
        "pass_ms": round(f["pass_ms"], 1),
        "first_pass_ms": round(f["first_pass_ms"], 1),
        "full_pass_ms": round(f["full_pass_ms"], 1),
        "queue_shift_pass_ms": round(f["queue_shift_pass_ms"], 1),
        "notify_ms": round(f["notify_ms"], 1),
        "raw_bulk_placements_per_s": round(f["raw_bulk_placements_per_s"]),
        "placements_per_s_ratio": ceilings.ratio(f["placements_per_s"], f["raw_bulk_placements_per_s"]),
        "raw_notify_round_trip_ms_p50": f["raw_p50_ms"],
        "raw_notify_round_trip_ms_p99": f["raw_p99_ms"],
        "submit_to_allocated_ms_p50_ratio": ceilings.ratio(f["p50_ms"], f["raw_p50_ms"]),
        "submit_to_allocated_ms_p99_ratio": ceilings.ratio(f["p99_ms"], f["raw_p99_ms"]),
        "gang_mix_placements_per_s": round(gang_figures["placements_per_s"]),
        "gang_mix_decision_us_median": round(gang_figures["decision_us_median"], 1),
        "gang_decision_us_median": round(gang_figures["gang_decision_us_median"], 1),
    }
    if 8000 in figures:
        big = figures[8000]
        out.update({"placements_per_s_8000": round(big["placements_per_s"]),
                    "pass_ms_8000": round(big["pass_ms"], 1),
                    "decision_us_median_8000": round(big["decision_us_median"], 1),
                    "submit_to_allocated_ms_p50_8000": round(big["p50_ms"], 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
