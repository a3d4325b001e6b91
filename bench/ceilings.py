"""Raw ceilings the benches compare against, measured in the same run.

Absolute figures on a shared machine move from run to run; the ratio of a
figure to what plain PostgreSQL (or plain Python) does on the same machine at
the same moment moves much less. Each function here measures the simplest
possible way to do the same work, with psycopg alone (no Django, no web
server, no scheduler), on scratch tables it creates and drops itself:

- ``single_commits_per_s``: one-row INSERT + COMMIT per round trip, from as many
  connections (separate processes) as the bench's clients: the floor under a
  single submit;
- ``heartbeat_rows_per_s``: one set-based UPDATE of 8 GPU rows + COMMIT per
  round trip, from several processes: the floor under a heartbeat;
- ``notify_round_trip_ms``: commit a row with NOTIFY, a LISTENing connection
  answers with its own committed row, the caller polls for it every 2 ms (as
  ``bench/scheduler.py`` polls for the allocation): the floor under
  submit -> allocated; ``spawn=True`` also starts a process from the listener
  and waits for it to write its start time (the floor under submit -> started);
- ``bulk_placements_per_s`` (in ``bench/scheduler.py``): the same placements a
  pass made, written with three set-based statements and one commit.

Ratios are always ``figure / ceiling``: below 1 for rates (higher is better),
above 1 for latencies (lower is better).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

from bench import loadgen


def database_url() -> str:
    """The URL the benches use: DATABASE_URL, else the embedded PostgreSQL (started if needed)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from portal import embedded_db

    return embedded_db.ensure_running()


def ratio(figure: float, ceiling: float) -> float:
    return round(figure / ceiling, 3) if ceiling else float("nan")


def _scratch(prefix: str) -> str:
    return f"bench_ceiling_{prefix}_{uuid.uuid4().hex[:8]}"


def _commit_loop(url: str, table: str, seconds: float, start_at: float, out) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while time.time() < start_at:
            time.sleep(0.001)
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.execute(f"INSERT INTO {table} (tenant_id, body) VALUES (%s, %s)", [n % 4, "python train.py"])  # noqa: S608
            n += 1
    out.put(n)


def single_commits_per_s(url: str, connections: int, seconds: float = 3.0) -> float:
    """One-row INSERT + COMMIT per round trip from ``connections`` processes; commits/s in all."""
    table = _scratch("commits")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, tenant_id int NOT NULL, body text NOT NULL, "
                     "created_at timestamptz NOT NULL DEFAULT now())")
    try:
        total = _run_processes(_commit_loop, url, table, connections, seconds)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    return total / seconds


_HEARTBEAT_UPDATE = """
UPDATE {table} AS g SET memory_used_mb = v.used, utilization_pct = v.util, temperature_c = v.temp,
    updated_at = now()
FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[]) AS v(id, used, util, temp)
WHERE g.id = v.id
"""


def _heartbeat_loop(url: str, table: str, seconds: float, start_at: float, out) -> None:
    rng = os.getpid()
    with psycopg.connect(url, autocommit=True) as conn:
        (servers,) = conn.execute(f"SELECT max(server) + 1 FROM {table}").fetchone()  # noqa: S608
        while time.time() < start_at:
            time.sleep(0.001)
        n, end = 0, time.perf_counter() + seconds
        statement = _HEARTBEAT_UPDATE.format(table=table)
        while time.perf_counter() < end:
            server = (rng + n) % servers
            ids = [server * 8 + i + 1 for i in range(8)]
            conn.execute(statement, [ids, [n % 80_000] * 8, [n % 100] * 8, [40 + n % 30] * 8])
            n += 1
    out.put(n * 8)


def heartbeat_rows_per_s(url: str, connections: int, servers: int = 1000, seconds: float = 3.0) -> float:
    """One set-based UPDATE of a server's 8 GPU rows + COMMIT per round trip; GPU rows/s in all."""
    table = _scratch("gpus")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, server int NOT NULL, memory_used_mb int, "
                     "utilization_pct int, temperature_c int, updated_at timestamptz)")
        conn.execute(f"INSERT INTO {table} (server) SELECT s FROM generate_series(0, %s) s, generate_series(1, 8)",  # noqa: S608
                     [servers - 1])
    try:
        total = _run_processes(_heartbeat_loop, url, table, connections, seconds)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    return total / seconds


def _run_processes(target, url: str, table: str, n: int, seconds: float) -> int:
    ctx = mp.get_context("spawn")  # no inherited Django or database state
    out = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=target, args=(url, table, seconds, start_at, out)) for _ in range(n)]
    for p in procs:
        p.start()
    return sum(loadgen.results_of(procs, out, seconds + 60))


def notify_round_trip_ms(url: str, samples: int = 50, *, spawn: bool = False) -> dict[str, float]:
    """Commit + NOTIFY -> a listener commits an answer row (or starts a process) -> seen by polling every 2 ms.

    Returns p50 and p99 in ms.
    """
    asked, answered = _scratch("ask"), _scratch("answer")
    channel = asked
    marks = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {asked} (id bigint PRIMARY KEY)")
        conn.execute(f"CREATE TABLE {answered} (id bigint PRIMARY KEY)")
    stop = threading.Event()

    def listen() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"LISTEN {channel}")
            ready.set()
            while not stop.is_set():
                if not select.select([conn.fileno()], [], [], 0.2)[0]:
                    continue
                # Collected first: the connection cannot run a statement while it yields notifies.
                for note in list(conn.notifies(timeout=0, stop_after=100)):
                    if spawn:
                        subprocess.Popen(["sh", "-c", f"date +%s%N > {marks}/{note.payload}"])
                    else:
                        conn.execute(f"INSERT INTO {answered} (id) VALUES (%s)", [int(note.payload)])  # noqa: S608

    ready = threading.Event()
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    if not ready.wait(60):
        raise SystemExit("ceiling: the listener did not connect within 60 s")
    results: list[float] = []
    try:
        with psycopg.connect(url) as conn, psycopg.connect(url, autocommit=True) as watcher:
            for i in range(samples):
                t0 = time.time()
                conn.execute(f"INSERT INTO {asked} (id) VALUES (%s)", [i])  # noqa: S608
                conn.execute("SELECT pg_notify(%s, %s)", [channel, str(i)])
                conn.commit()
                while True:
                    if spawn:
                        try:
                            done = int((marks / str(i)).read_text()) / 1e9
                            break
                        except (OSError, ValueError):
                            pass
                    elif watcher.execute(f"SELECT 1 FROM {answered} WHERE id = %s", [i]).fetchone():  # noqa: S608
                        done = time.time()
                        break
                    if time.time() - t0 > 30:
                        raise SystemExit("ceiling: the listener did not answer within 30 s")
                    time.sleep(0.002)
                results.append((done - t0) * 1000)
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join(5)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {asked}")
            conn.execute(f"DROP TABLE IF EXISTS {answered}")
    ordered = sorted(results)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2)}
