"""Agent benchmarks: submit-to-process-started latency and heartbeat ingestion.

    .venv/bin/python bench/agent.py [--quick]

Runs against DATABASE_URL (or the embedded PostgreSQL), with real processes:
the web node (``portal.webserver``), ``manage.py runscheduler`` and simulated-GPU agents.

1. Start latency on an idle simulated cluster (2 agents x 8 GPUs): a task is
   submitted (committed as pending, scheduler woken), placed by the scheduler,
   pushed to its agent over the websocket and started; the task's command writes
   the time it started. Also measured: allocation commit -> process start, with
   the allocation written directly (the agent's share of the path).
2. Heartbeat ingestion: 1,000 servers x 8 GPUs with real node tokens, each running four
   2-GPU tasks (what a heartbeat reads grows with its own server's tasks, not the cluster's); two
   load-generator processes post heartbeats over HTTP as fast as the web
   processes take them while this process runs scheduling passes beside them
   (pass time compared with and without the load).

Beside the figures, the raw ceilings measured in the same run (``bench.ceilings``)
and the ratios to them (keys ending ``_ratio``): for the start latency, a commit +
NOTIFY answered by a listener that starts a process; for heartbeats, one set-based
UPDATE of 8 GPU rows + COMMIT per round trip.

Everything the bench creates (tenant "bench", servers "bench-*") is removed at the end.
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from bench import ceilings, loadgen  # noqa: E402
from bench.api import cpu_seconds  # noqa: E402
from kernel import live  # noqa: E402
from nodes.enrolment import issue_join_token  # noqa: E402
from nodes.models import GPU, JoinToken, Node  # noqa: E402
from portal import webserver  # noqa: E402
from scheduling import triggers  # noqa: E402
from scheduling.choices import TaskStatus  # noqa: E402
from scheduling.models import Allocation, Task  # noqa: E402
from scheduling.passes import run_pass  # noqa: E402
from tenants.models import Quota, Tenant  # noqa: E402

PY = sys.executable
LABELS = {"bench": "yes"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"bench: timed out waiting for {what}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def web(self, port: int, config: Path) -> None:
        # The web node as `make run` starts it (portal.webserver), one worker per port.
        self.start(f"web-{port}", webserver.argv("127.0.0.1", port, workers=1, python=PY),
                   PORTAL_CONFIG=str(config), PORTAL_PROCESS_NAME="bench-web", LOG_LEVEL="WARNING",
                   DB_POOL_MAX_SIZE=str(webserver.POOL_PER_WORKER))

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 30, f"web process on port {port}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def cleanup() -> None:
    Task.objects.filter(tenant__slug="bench").delete()
    Node.objects.filter(name__startswith="bench-").delete()
    JoinToken.objects.filter(note="bench").delete()
    Tenant.objects.filter(slug="bench").delete()


def bench_tenant() -> Tenant:
    tenant = Tenant.objects.create(name="Bench", slug="bench")
    Quota.objects.create(tenant=tenant, max_gpus=10_000, max_gpu_memory_mb=10**9, max_running_tasks=10_000,
                         max_pending_tasks=100_000, max_priority=3)
    return tenant


def start_latency(procs: Processes, tmp: Path, work_root: Path, url: str, config: Path, tenant: Tenant,
                  n: int) -> dict:
    token_file = tmp / "join-token"
    token_file.write_text(issue_join_token(note="bench"))
    accounts = ["--single-user-host"] if os.geteuid() != 0 else []  # as root: tasks run as nobody
    for name in ("bench-gpu-01", "bench-gpu-02"):
        own_token = tmp / f"join-token-{name}"  # each agent removes its copy once spent
        shutil.copyfile(token_file, own_token)
        procs.start(name, [PY, "-m", "nodes.agent", "--portal", url, "--name", name, "--simulate", "8xH100-80GB",
                           "--state-dir", str(tmp / name), "--join-token-file", str(own_token),
                           "--work-root", str(work_root), "--kill-tasks-on-exit", "--log-level", "WARNING",
                           *accounts])
    wait_for(lambda: Node.objects.filter(name__startswith="bench-gpu-", status="active").count() == 2
             and GPU.objects.filter(node__name__startswith="bench-gpu-").count() == 16, 30, "the bench agents")
    Node.objects.filter(name__startswith="bench-gpu-").update(labels=LABELS)
    procs.start("scheduler", [PY, "manage.py", "runscheduler"], PORTAL_CONFIG=str(config),
                PORTAL_PROCESS_NAME="bench-scheduler", LOG_LEVEL="WARNING")
    time.sleep(2)  # let the scheduler and both websockets settle before timing anything
    def started_at(task_id: int) -> float | None:
        try:  # each task notes its start in its own working directory
            return int((work_root / f"{task_id}-0" / "started_ns").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def run_one(submit) -> float:
        t0 = time.time()
        task = submit()
        t1 = wait_for(lambda: started_at(task.pk), 30, f"task {task.pk} to start")
        wait_for(lambda: Task.objects.filter(pk=task.pk, status="succeeded").exists(), 30, "the task to end")
        return (t1 - t0) * 1000

    command = "date +%s%N > started_ns"

    def submit_pending() -> Task:
        with transaction.atomic():
            task = Task.objects.create(tenant=tenant, name="bench", command=command, gpu_count=1,
                                       gpu_memory_mb=1_000, node_selector=LABELS)
            triggers.request_pass("bench submit")
        return task

    nodes = list(Node.objects.filter(name__startswith="bench-gpu-").order_by("name"))

    def submit_assigned(i: int) -> Task:
        node = nodes[i % 2]
        gpu = node.gpus.get(index=i % 8)
        with transaction.atomic():
            task = Task.objects.create(tenant=tenant, name="bench", command=command, status="assigned", node=node,
                                       assigned_at=timezone.now(), gpu_count=1, gpu_memory_mb=1_000)
            Allocation.objects.create(task=task, gpu=gpu, node=node, memory_mb=1_000)
            live.assignments_changed([node.pk])
        return task

    submit = [run_one(submit_pending) for _ in range(n)]
    commit = [run_one(lambda i=i: submit_assigned(i)) for i in range(n)]
    return {
        "start_latency_ms_p50": round(statistics.median(submit), 1),
        "start_latency_ms_p99": round(pct(submit, 0.99), 1),
        "allocation_commit_to_start_ms_p50": round(statistics.median(commit), 1),
        "allocation_commit_to_start_ms_p99": round(pct(commit, 0.99), 1),
        "start_latency_tasks": n,
    }


def heartbeat_payload(node: Node, tick: int) -> dict:
    return {"name": node.name, "agent_version": "bench", "gpus": [
        {"index": i, "uuid": f"GPU-{node.name}-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81_559,
         "memory_used_mb": (tick * 997 + i * 131) % 80_000, "utilization_pct": (tick + i) % 100,
         "temperature_c": 40 + i, "power_w": 300 + i, "ecc_errors": 0, "retired_pages": 0}
        for i in range(8)]}


class _Poster:
    """One load thread's keep-alive connections, one per web process (``bench.loadgen``)."""

    def __init__(self, ports: list[int]) -> None:
        self.conns = {port: loadgen.KeepAlive(port) for port in ports}

    def heartbeat(self, port: int, node: Node, token: str, tick: int) -> int:
        """Post one heartbeat of ``node``; its HTTP status, or 0 when the connection failed."""
        try:
            return self.conns[port].exchange(loadgen.request(
                "POST", port, "/api/agent/v1/heartbeat", f"Node {token}",
                json.dumps(heartbeat_payload(node, tick)).encode()))[0]
        except OSError:
            return 0

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def _in_threads(concurrency: int, work) -> None:
    """``work(w)`` in ``concurrency`` threads; a thread that fails ends the bench with one line
    (a thread's exception is otherwise only printed, and the bench would measure without it)."""
    failures: list[BaseException] = []

    def run(w: int) -> None:
        try:
            work(w)
        except BaseException as exc:  # handed to the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} of {concurrency} load threads failed, e.g. {failures[0]!r}")


def hammer(ports: list[int], servers: list[tuple[Node, str]], seconds: float, concurrency: int) -> tuple[int, int]:
    """``concurrency`` threads post heartbeats for ``seconds``, each server's one at a time and in
    order (a server is taken from the queue, posted, and put back), as its agent would."""
    answers = collections.Counter()  # per HTTP status (0: no answer), merged from the threads
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    queue = collections.deque(range(len(servers)))  # append and popleft are atomic

    def worker(w: int) -> None:
        poster, tick, mine = _Poster(ports), 0, collections.Counter()
        while time.monotonic() < deadline:
            i = queue.popleft()
            node, token = servers[i]
            tick += 1
            mine[poster.heartbeat(ports[(w + i) % len(ports)], node, token, tick)] += 1
            queue.append(i)
        poster.close()
        with lock:
            answers.update(mine)

    _in_threads(concurrency, worker)
    failed = {status: n for status, n in answers.items() if status != 200}
    if failed:
        print(f"heartbeat failures by HTTP status (0: no answer): {failed}", file=sys.stderr)
    return answers[200], sum(failed.values())


def first_reports(ports: list[int], servers: list[tuple[Node, str]], concurrency: int) -> None:
    """One heartbeat from every server to every web process."""
    queue = collections.deque((port, node, token) for port in ports for node, token in servers)
    refused: list[str] = []

    def worker(_w: int) -> None:
        poster = _Poster(ports)
        while True:
            try:
                port, node, token = queue.popleft()
            except IndexError:
                break
            status = poster.heartbeat(port, node, token, 0)
            if status != 200:
                refused.append(f"{node.name} -> :{port}: HTTP {status}")
        poster.close()

    _in_threads(concurrency, worker)
    if refused:
        raise SystemExit(f"first heartbeats refused ({len(refused)}), e.g. {refused[0]}")


# Processes posting heartbeats, each for its own share of the servers (a server's
# heartbeats stay one at a time, in order, as from a real agent).
LOAD_PROCESSES = 2


def _load(ports: list[int], servers: list[tuple[Node, str]], seconds: float, concurrency: int, out) -> None:
    cpu0 = time.process_time()
    ok, failed = hammer(ports, servers, seconds, concurrency)
    out.put((ok, failed, time.process_time() - cpu0))


def pass_times(seconds: float) -> list[float]:
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        run_pass(actor="bench")
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)
    return times


def heartbeat_rate(procs: Processes, config: Path, tenant: Tenant, servers_n: int, seconds: float,
                   web_n: int) -> dict:
    nodes = Node.objects.bulk_create(Node(name=f"bench-hb-{i:04d}", status="active", labels=LABELS)
                                     for i in range(servers_n))
    servers = [(node, node.issue_token()) for node in nodes]
    GPU.objects.bulk_create(GPU(node=node, index=i, uuid=f"GPU-{node.name}-{i}", model_name="NVIDIA H100 80GB HBM3",
                                memory_total_mb=81_559) for node in nodes for i in range(8))
    # A busy cluster: every server runs four 2-GPU tasks (4,000 active tasks at 1,000 servers).
    # Each heartbeat reads its own server's (the assignments ETag); a read that scanned every
    # active task went unseen here while the servers ran nothing.
    running = Task.objects.bulk_create(
        Task(tenant=tenant, name=f"busy-{node.name}-{j}", command="true", gpu_count=2, gpu_memory_mb=40_000,
             status=TaskStatus.RUNNING, node=node, started_at=timezone.now()) for node in nodes for j in range(4))
    gpus = {(g.node_id, g.index): g.pk for g in GPU.objects.filter(node__in=nodes)}
    Allocation.objects.bulk_create(
        Allocation(task=task, gpu_id=gpus[(task.node_id, 2 * (i % 4) + k)], node_id=task.node_id, memory_mb=40_000)
        for i, task in enumerate(running) for k in range(2))
    # Work for the passes: tasks no server can take (a GPU model nobody has), so each pass scans them all.
    Task.objects.bulk_create(Task(tenant=tenant, name="unplaceable", command="true", gpu_model="B999",
                                  node_selector=LABELS) for _ in range(200))
    ports = [free_port() for _ in range(web_n)]
    for port in ports:
        procs.web(port, config)
    idle = pass_times(min(seconds, 5))
    # Warm up as a running cluster is warm: every server has reported to every web process
    # (each process keeps the node tokens it verified; a first report from each of 1,000
    # servers is not steady-state ingestion), then connections and GPU rows, then measure.
    first_reports(ports, servers, 12)
    hammer(ports, servers, 2, 12)
    # The load comes from processes of its own: from a thread of this one it would share the
    # interpreter lock with the passes below, and the figure would be how fast this process
    # can post while it schedules, not how fast the web processes ingest.
    from django.db import connection

    connection.close()  # no connection is inherited by the load generators
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    shares = [servers[g::LOAD_PROCESSES] for g in range(LOAD_PROCESSES)]
    generators = [ctx.Process(target=_load, args=(ports, share, seconds, 12 // LOAD_PROCESSES, out))
                  for share in shares]
    cpu0 = cpu_seconds(procs.procs)
    t0 = time.monotonic()
    for g in generators:
        g.start()
    busy = pass_times(seconds - 1)
    counts = loadgen.results_of(generators, out, seconds + 60)
    elapsed = time.monotonic() - t0
    web_cpu = cpu_seconds(procs.procs) - cpu0
    ok, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {
        "heartbeat_gpu_rows_per_s": round(ok * 8 / elapsed),
        "heartbeats_per_s": round(ok / elapsed, 1),
        "heartbeat_failures": failed,
        # CPU of the web processes per heartbeat: steadier than the rate on a shared machine.
        "heartbeat_web_cpu_ms": round(web_cpu * 1000 / max(ok, 1), 2),
        # And of the load generators: they share the machine's cores with what they measure.
        "heartbeat_client_cpu_ms": round(sum(c[2] for c in counts) * 1000 / max(ok, 1), 2),
        "heartbeat_servers": servers_n,
        "heartbeat_web_processes": web_n,
        "pass_ms_p50_idle": round(statistics.median(idle), 1),
        "pass_ms_p50_under_heartbeats": round(statistics.median(busy), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 3 minutes)")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--web", type=int, default=2, help="web processes taking heartbeats (default 2)")
    args = parser.parse_args()
    seconds = 15 if args.quick else 60
    # A clean clone's database has no tables yet: bring it to the current schema first.
    call_command("migrate", interactive=False, verbosity=0)
    cleanup()
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    work_root = Path(tempfile.mkdtemp(prefix="bench-agent-work-"))  # enterable by the tasks' accounts
    config = tmp / "portal.yaml"
    config.write_text("scheduler:\n  heartbeat_interval_s: 5\n  heartbeat_timeout_s: 600\n")
    procs = Processes(tmp)
    results: dict = {}
    try:
        tenant = bench_tenant()
        port = free_port()
        procs.web(port, config)
        results.update(start_latency(procs, tmp, work_root, f"http://127.0.0.1:{port}", config, tenant,
                                     args.tasks))
        print(json.dumps(results), flush=True)
        procs.stop_all()
        procs.procs.clear()
        results.update(heartbeat_rate(procs, config, tenant, args.servers, seconds, args.web))
    finally:
        procs.stop_all()
        cleanup()
        shutil.rmtree(work_root, ignore_errors=True)
    url = ceilings.database_url()
    raw_start = ceilings.notify_round_trip_ms(url, 50, spawn=True)
    raw_rows = ceilings.heartbeat_rows_per_s(url, 4, args.servers)
    print(f"raw ceilings: commit+NOTIFY -> process started p50 {raw_start['p50_ms']} ms; "
          f"set-based 8-row UPDATE+COMMIT {raw_rows:,.0f} GPU rows/s over 4 connections", flush=True)
    results.update({
        "raw_notify_to_process_ms_p50": raw_start["p50_ms"],
        "start_latency_ms_p50_ratio": ceilings.ratio(results["start_latency_ms_p50"], raw_start["p50_ms"]),
        "raw_heartbeat_gpu_rows_per_s": round(raw_rows),
        "heartbeat_gpu_rows_per_s_ratio": ceilings.ratio(results["heartbeat_gpu_rows_per_s"], raw_rows),
    })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
