"""Submit throughput and latency of the users' API, through real web processes.

    .venv/bin/python bench/api.py [--quick] [--web N] [--connections C] [--seconds S] [--server daphne|wsgi]

Starts the web node as ``make run`` does (``portal.webserver``: granian with N
worker processes on one port; ``--server daphne``: N daphne processes sharing one
listening socket, for comparison) on loopback, against DATABASE_URL (or the
embedded PostgreSQL), creates bench tenants/users/tokens and one 8-GPU server,
then drives them from separate load-generator processes over keep-alive HTTP:

1. single submits: C connections each POST /api/v1/tasks in a loop for S seconds;
   reports submits/s and client-side latency percentiles (p50/p95/p99), with the CPU the
   web processes and (when it runs on this machine) PostgreSQL spent per submit;
2. batches: POST /api/v1/tasks/batch with B tasks per request on a few connections.

The per-token throttle stays in the path with a high limit. Everything the bench
created is deleted at the end. Last line: one JSON object with submits_per_s,
submit_p95_ms, batch_tasks_per_s (and details), with the raw ceiling measured
in the same run (``bench.ceilings``: one-row INSERT + COMMIT from as many
connections as the clients) and the ratios to it (keys ending ``_ratio``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from bench import ceilings, loadgen  # noqa: E402 - after the path above

TENANTS = 4
PREFIX = "bench-api"


def setup_django():
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def make_fixtures(connections: int) -> tuple[list[tuple[str, str]], list[int]]:
    """Tenants with roomy quotas, a user per tenant, a token per connection, one server."""
    from django.contrib.auth import get_user_model

    from nodes.models import GPU, Node, NodeStatus
    from portal.api.authentication import create_token
    from tenants.choices import Priority
    from tenants.models import Membership, Quota, Tenant

    cleanup()
    node = Node.objects.create(name=f"{PREFIX}-gpu-01", status=NodeStatus.ACTIVE)
    GPU.objects.bulk_create(GPU(node=node, index=i, uuid=f"{PREFIX}-{i}", model_name="NVIDIA H100 80GB HBM3",
                                memory_total_mb=81_559) for i in range(8))
    users, tenant_ids = [], []
    for t in range(TENANTS):
        tenant = Tenant.objects.create(name=f"{PREFIX} {t}", slug=f"{PREFIX}-{t}")
        Quota.objects.create(tenant=tenant, max_pending_tasks=10_000_000, max_priority=Priority.CRITICAL)
        user = get_user_model().objects.create_user(f"{PREFIX}-{t}")
        Membership.objects.create(user=user, tenant=tenant)
        users.append((user, tenant.slug))
        tenant_ids.append(tenant.pk)
    tokens = []
    for c in range(connections):
        user, slug = users[c % TENANTS]
        tokens.append((create_token(user, f"{PREFIX} {c}")[1], slug))
    return tokens, tenant_ids


def delete_tasks() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        sub = "SELECT t.id FROM scheduling_task t JOIN tenants_tenant n ON n.id = t.tenant_id WHERE n.slug LIKE %s"
        for table in ("scheduling_taskevent", "scheduling_tasklogchunk", "scheduling_allocation"):
            cursor.execute(f"DELETE FROM {table} WHERE task_id IN ({sub})", [f"{PREFIX}-%"])  # noqa: S608
        cursor.execute(f"DELETE FROM scheduling_task WHERE id IN ({sub})", [f"{PREFIX}-%"])  # noqa: S608


def cleanup() -> None:
    from django.contrib.auth import get_user_model

    from nodes.models import Node
    from tenants.models import Tenant

    delete_tasks()
    Tenant.objects.filter(slug__startswith=PREFIX).delete()
    get_user_model().objects.filter(username__startswith=PREFIX).delete()
    Node.objects.filter(name__startswith=PREFIX).delete()


# --- the web processes -------------------------------------------------------------------


def start_redis() -> tuple[str, subprocess.Popen]:
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"redis://127.0.0.1:{port}/0", proc
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(n: int, redis_url: str | None = None, server: str = "granian",
              ) -> tuple[int, list[subprocess.Popen], socket.socket | None]:
    """``n`` web processes on one port: the web node as ``make run`` starts it
    (``portal.webserver``, granian with n workers), or n daphne processes sharing one
    listening socket (``--server daphne``, for comparison)."""
    from portal import webserver

    env = {**os.environ, "API_RATE_LIMIT": "1000000", "API_RATE_BURST": "1000000",
           "PORTAL_PROCESS_NAME": "gpu-portal-bench-web", "LOG_LEVEL": "WARNING"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    env = webserver.env(env)  # the same connection pool for both servers
    if server == "granian":
        port = _free_port()
        proc = subprocess.Popen(webserver.argv("127.0.0.1", port, n), cwd=ROOT, env=env, start_new_session=True)
        return port, [proc], None
    if server == "wsgi":  # HTTP only: granian's WSGI interface, no websockets
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(n), "--blocking-threads", env["DB_POOL_MAX_SIZE"], "--log-level", "warning",
             "portal.wsgi:application"], cwd=ROOT, env=env, start_new_session=True)
        return port, [proc], None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-m", "daphne", "-v", "0", "--fd", str(sock.fileno()),
                          "portal.asgi:application"], cwd=ROOT, env=env, pass_fds=[sock.fileno()],
                         start_new_session=True)
        for _ in range(n)
    ]
    return port, procs, sock


def stop_web(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def wait_ready(port: int, token: str, timeout: float = 60) -> None:
    ready = loadgen.request("GET", port, "/api/v1/quota", f"Token {token}")
    conn = loadgen.KeepAlive(port, timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if conn.exchange(ready)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        conn.close()
    raise SystemExit("the web processes did not answer within 60 s")


# --- load generators ---------------------------------------------------------------------


def _client(port: int, token: str, body: bytes, path: str, seconds: float, start_at: float, out) -> None:
    """One keep-alive connection posting ``body`` in a loop (``bench.loadgen``); puts (latencies,
    errors, first error, this process's CPU seconds while measuring) on ``out``."""
    request = loadgen.request("POST", port, path, f"Token {token}", body)
    conn = loadgen.KeepAlive(port)
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    latencies, errors, first_error = [], 0, ""
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            status, answer = conn.exchange(request)
            ok = status == 201
            if not ok and not first_error:
                first_error = f"HTTP {status} {answer[:160]!r}"
        except OSError as exc:
            ok = False
            first_error = first_error or repr(exc)
        if ok:
            latencies.append(time.perf_counter() - t0)
        else:
            errors += 1
    conn.close()
    out.put((latencies, errors, first_error, time.process_time() - cpu0))


def drive(port: int, tokens: list[tuple[str, str]], make_body, path: str,
          seconds: float) -> tuple[list[float], int, float, float]:
    """Requests from one process per token for ``seconds``: (latencies, errors, seconds, the
    load generators' CPU seconds in all)."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=_client, args=(port, tok, make_body(slug), path, seconds, start_at, out))
             for tok, slug in tokens]
    for p in procs:
        p.start()
    results = loadgen.results_of(procs, out, seconds + 60)
    latencies = [x for lat, _, _, _ in results for x in lat]
    first = next((f for _, _, f, _ in results if f), "")
    if first:
        print(f"  first error: {first}", flush=True)
    return latencies, sum(e for _, e, _, _ in results), seconds, sum(c for _, _, _, c in results)


def _cpu_of(processes) -> float:
    """CPU time (user + system) the given processes have used so far; one that ended
    meanwhile, or is not ours to read, counts nothing."""
    import psutil

    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """CPU time (user + system) the web processes have used so far: a figure that
    does not depend on how busy the rest of the machine is."""
    import psutil

    tree = []
    for p in procs:
        try:
            parent = psutil.Process(p.pid)
            tree += [parent, *parent.children(recursive=True)]  # a server's worker processes too
        except psutil.NoSuchProcess:
            pass
    return _cpu_of(tree)


def database_cpu_seconds() -> float | None:
    """CPU time (user + system) of this machine's PostgreSQL processes so far, backends and
    background workers alike; None when none is visible (DATABASE_URL on another machine)."""
    import psutil

    postgres = [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]
    return _cpu_of(postgres) if postgres else None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (well under 3 minutes)")
    parser.add_argument("--web", type=int, default=max(2, os.cpu_count() or 2), help="web processes")
    parser.add_argument("--connections", type=int, default=8, help="concurrent single-submit connections")
    parser.add_argument("--seconds", type=float, help="length of each phase")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-connections", type=int, default=2)
    parser.add_argument("--server", choices=("granian", "daphne", "wsgi"), default="granian",
                        help="granian: the web node of make run (default); daphne: the ASGI server it replaced;"
                             " wsgi: granian's WSGI interface (portal.wsgi, HTTP only), for comparison")
    parser.add_argument("--redis", action="store_true",
                        help="run the Channels layer on a local redis-server instead of PostgreSQL")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 30.0)

    setup_django()
    tokens, _ = make_fixtures(max(args.connections, args.batch_connections))
    from django.db import connection

    connection.close()  # no DB connection is inherited by the forked load generators
    redis = start_redis() if args.redis else None
    port, web, sock = start_web(args.web, redis[0] if redis else None, args.server)
    try:
        wait_ready(port, tokens[0][0])
        # Warm every web process (connections, imports) before measuring.
        drive(port, tokens[: args.connections], lambda slug: json.dumps(
            {"tenant": slug, "command": "python warmup.py"}).encode(), "/api/v1/tasks", 2.0)

        single = lambda slug: json.dumps({"tenant": slug, "name": "bench", "command": "python train.py --epochs 1",  # noqa: E731
                                          "gpu_count": 1, "gpu_memory_mb": 20_000, "priority": "NORMAL"}).encode()
        cpu0, db_cpu0 = cpu_seconds(web), database_cpu_seconds()
        lat, errors, secs, client_cpu = drive(port, tokens[: args.connections], single, "/api/v1/tasks", seconds)
        submit_cpu_ms = (cpu_seconds(web) - cpu0) * 1000 / max(len(lat), 1)
        db_cpu1 = database_cpu_seconds()
        db_cpu_ms = (None if db_cpu0 is None or db_cpu1 is None
                     else (db_cpu1 - db_cpu0) * 1000 / max(len(lat), 1))
        client_cpu_ms = client_cpu * 1000 / max(len(lat), 1)
        from scheduling.models import Task

        # The queue's depth: a submit counts its tenant's pending tasks only near its limit
        # (scheduling.models.PendingBound), but whatever reads the queue reads this many.
        queued = Task.objects.filter(tenant__slug__startswith=PREFIX, status="pending").count() // TENANTS
        submits_per_s = len(lat) / secs
        print(f"single submits: {len(lat)} in {secs:.0f} s = {submits_per_s:.0f}/s over {args.connections} "
              f"connections, {args.web} web processes; latency p50 {pct(lat, 50) * 1000:.1f} ms, "
              f"p95 {pct(lat, 95) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms; errors {errors}; "
              f"web CPU {submit_cpu_ms:.1f} ms per submit (load generators {client_cpu_ms:.2f} ms); "
              + ("" if db_cpu_ms is None else f"PostgreSQL CPU {db_cpu_ms:.2f} ms per submit, ")
              + f"{queued} pending tasks per tenant at the end; load average {os.getloadavg()[0]:.1f}", flush=True)
        delete_tasks()
        connection.close()

        def batch(slug: str) -> bytes:
            return json.dumps({"tasks": [{"tenant": slug, "name": f"b{i}", "command": "python infer.py",
                                          "gpu_count": 1, "gpu_memory_mb": 10_000} for i in range(args.batch_size)]
                               }).encode()

        blat, berrors, bsecs, _cpu = drive(port, tokens[: args.batch_connections], batch, "/api/v1/tasks/batch",
                                           seconds)
        batch_tasks_per_s = len(blat) * args.batch_size / bsecs
        print(f"batches: {len(blat)} x {args.batch_size} tasks in {bsecs:.0f} s = {batch_tasks_per_s:.0f} tasks/s "
              f"over {args.batch_connections} connections; batch latency p50 {pct(blat, 50) * 1000:.0f} ms, "
              f"p95 {pct(blat, 95) * 1000:.0f} ms; errors {berrors}", flush=True)
    finally:
        stop_web(web)
        if sock is not None:
            sock.close()
        if redis:
            redis[1].terminate()
            redis[1].wait()
        connection.close()
        cleanup()
    raw_commits = ceilings.single_commits_per_s(ceilings.database_url(), args.connections)
    print(f"raw ceiling: {raw_commits:,.0f} one-row commits/s over {args.connections} connections "
          f"(submits at {submits_per_s / raw_commits:.1%} of it)", flush=True)
    print(json.dumps({
        "submits_per_s": round(submits_per_s, 1),
        "raw_single_commits_per_s": round(raw_commits, 1),
        "submits_per_s_ratio": ceilings.ratio(submits_per_s, raw_commits),
        "submit_p95_ms": round(pct(lat, 95) * 1000, 2),
        "submit_p50_ms": round(pct(lat, 50) * 1000, 2),
        "submit_errors": errors,
        "submit_web_cpu_ms": round(submit_cpu_ms, 2),
        "submit_client_cpu_ms": round(client_cpu_ms, 3),
        "submit_db_cpu_ms": None if db_cpu_ms is None else round(db_cpu_ms, 2),
        "pending_per_tenant_at_end": queued,
        "load_average": round(os.getloadavg()[0], 2),
        "batch_tasks_per_s": round(batch_tasks_per_s, 1),
        "batch_size": args.batch_size,
        "web_processes": args.web,
        "server": args.server,
        "connections": args.connections,
        "cpus": os.cpu_count(),
        "channel_layer": "redis" if args.redis else "postgres",
    }))


if __name__ == "__main__":
    main()
