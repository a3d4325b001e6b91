"""History sampling benchmark: what ``scheduling.history`` costs the database, beside a raw ceiling.

    .venv/bin/python bench/history.py [--quick]

Builds a cluster (1,000 x 8 = 8,000 GPUs, 50 tenants, 2,000 GPUs allocated; --quick: 200
servers) in its own database, then times:

* ``sample()``: one ``INSERT ... SELECT`` for every live GPU plus one for every tenant, the
  work ``runscheduler`` does every ``HISTORY_SAMPLE_S``. Ceiling: the same GPU columns
  copied by a bare ``INSERT ... SELECT`` into an unindexed table (same WAL and commit) (the database's
  own speed for that many rows, with no unique index, no join and no conflict check);
* ``roll_up()`` over 5 minutes of raw samples (30 per GPU), the once-a-minute job. Ceiling:
  the same ``GROUP BY date_bin`` aggregation read without writing.

Heartbeats are not on the list: they write nothing for history. Timings are the median of
several runs (ms). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")


def build(servers: int) -> int:
    from django.utils import timezone

    from nodes.models import GPU, Node, NodeStatus
    from scheduling.models import Allocation, Task
    from tenants.models import Quota, Tenant

    now = timezone.now()
    nodes = Node.objects.bulk_create(Node(name=f"bench-{i:04d}", status=NodeStatus.ACTIVE, last_heartbeat_at=now)
                                     for i in range(servers))
    gpus = GPU.objects.bulk_create(
        GPU(node=n, index=i, uuid=f"GPU-{n.name}-{i}", model_name="NVIDIA H100 80GB HBM3", memory_total_mb=81_559,
            memory_used_mb=512 + (n.pk * 7 + i * 13) % 60_000, utilization_pct=(n.pk + i * 11) % 100,
            temperature_c=35 + (n.pk + i) % 40) for n in nodes for i in range(8))
    tenants = Tenant.objects.bulk_create(Tenant(name=f"Tenant {i}", slug=f"t{i}") for i in range(50))
    Quota.objects.bulk_create(Quota(tenant=t, max_gpus=400) for t in tenants)
    busy = gpus[: len(gpus) // 4]
    tasks = Task.objects.bulk_create(Task(tenant=tenants[i % 50], name="b", command="x", status="running",
                                          node_id=g.node_id) for i, g in enumerate(busy))
    Allocation.objects.bulk_create(Allocation(task=t, gpu=g, node_id=g.node_id, memory_mb=40_000)
                                   for t, g in zip(tasks, busy, strict=True))
    return len(gpus)


def timed(fn, runs: int) -> float:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 servers (1,600 GPUs) instead of 1,000")
    args = parser.parse_args()
    from scheduler import bench_database_url  # bench/scheduler.py: a fresh database of its own

    os.environ["DATABASE_URL"] = bench_database_url()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from kernel.models import GpuSample
    from scheduling import history

    call_command("migrate", verbosity=0)
    gpus = build(200 if args.quick else 1000)
    runs = 5 if args.quick else 9
    base = timezone.now()
    step = timedelta(seconds=10)
    print(f"== {gpus} GPUs, 50 tenants, {gpus // 4} GPUs allocated", flush=True)

    # Every call is its own bucket, as successive runscheduler ticks would be.
    sample_ms = timed(lambda i: history.sample(base + i * step), runs)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_copy (gpu_id bigint, resolution smallint, at timestamptz, "
                       "u double precision, m double precision, t double precision)")

        def copy(_i: int) -> None:
            cursor.execute("INSERT INTO bench_copy SELECT id, 0, now(), utilization_pct, memory_used_mb, "
                           "temperature_c FROM nodes_gpu")

        copy_ms = timed(copy, runs)
    print(f"sample(): {sample_ms:.1f} ms for {gpus} GPUs + 50 tenants "
          f"(ceiling, a bare copy of the GPU rows: {copy_ms:.1f} ms)", flush=True)

    # Five minutes of raw samples (30 a GPU), then the once-a-minute rollup over them.
    GpuSample.objects.all().delete()
    for i in range(30):
        history.sample(base + i * step)
    end = base + 30 * step
    rollup_ms = timed(lambda _i: history.roll_up(end), 3)
    with connection.cursor() as cursor:
        def aggregate(_i: int) -> None:
            cursor.execute("SELECT gpu_id, date_bin(interval '60 seconds', at, timestamptz '2000-01-01'), "
                           "AVG(utilization_pct), AVG(memory_used_mb), AVG(temperature_c) FROM portal_gpusample "
                           "WHERE resolution = 0 GROUP BY 1, 2")
            cursor.fetchall()

        aggregate_ms = timed(aggregate, 3)
    print(f"roll_up(): {rollup_ms:.1f} ms over {30 * gpus} raw samples "
          f"(ceiling, the same aggregation read only: {aggregate_ms:.1f} ms)", flush=True)
    print(json.dumps({"gpus": gpus, "sample_ms": round(sample_ms, 2), "sample_ceiling_copy_ms": round(copy_ms, 2),
                      "rollup_ms": round(rollup_ms, 2), "rollup_ceiling_aggregate_ms": round(aggregate_ms, 2),
                      "heartbeat_extra_writes": 0}))


if __name__ == "__main__":
    main()
