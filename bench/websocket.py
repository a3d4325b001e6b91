"""Commit-to-screen latency of live GPU updates for many concurrent viewers.

    .venv/bin/python bench/websocket.py [--quick] [--viewers 100] [--rounds N] [--redis]

Runs against DATABASE_URL (or the embedded PostgreSQL). Starts one web
process as ``make run`` does (``portal.webserver``; channel layer: PostgreSQL,
or Redis with --redis / REDIS_URL), opens ``--viewers`` staff websockets to /ws/cluster/ (the admin console's feed) and
then, round after round, commits a new utilisation for one GPU from this
process and announces it through ``kernel.live.gpus_changed`` (as a heartbeat
or a scheduler pass on another node would). Each viewer notes when a frame with
the new value reaches it; the latency is that moment minus the commit.

Beside the figures: the raw ceiling measured in the same run, a commit + NOTIFY
answered by a LISTENing connection's committed row (``bench.ceilings``), and the
ratio of the p50 to it (``commit_to_screen_ms_p50_ratio``).

Everything the bench creates (server "bench-ws", user "bench-ws-operator") is
removed at the end. The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.test import Client  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from bench import ceilings  # noqa: E402
from kernel import live  # noqa: E402
from nodes.models import GPU, Node, NodeStatus  # noqa: E402
from portal import webserver  # noqa: E402

NODE, USER = "bench-ws", "bench-ws-operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(port: int, redis_url: str | None, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PORTAL_PROCESS_NAME": "bench-ws-web"}
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    # The web node as `make run` starts it (portal.webserver), with one worker: one
    # process holds every viewer, as with the single daphne this bench used before.
    proc = subprocess.Popen(
        webserver.argv("127.0.0.1", port, workers=1), cwd=ROOT, env=webserver.env(env), stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            raise SystemExit(f"the web server exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.1)
    raise SystemExit(f"the web server did not listen on {port} within 60 s; see {log_path}")


def setup() -> tuple[Node, GPU, str]:
    cleanup()
    node = Node.objects.create(name=NODE, hostname="bench", status=NodeStatus.ACTIVE)
    GPU.objects.bulk_create(GPU(node=node, index=i, uuid=f"GPU-{NODE}-{i}", model_name="NVIDIA H100 80GB HBM3",
                                memory_total_mb=81_559) for i in range(8))
    user = get_user_model().objects.create_user(USER, password=None, is_staff=True)
    client = Client()
    client.force_login(user)
    return node, node.gpus.get(index=0), client.cookies["sessionid"].value


def cleanup() -> None:
    GPU.objects.filter(node__name=NODE).delete()
    Node.objects.filter(name=NODE).delete()
    get_user_model().objects.filter(username=USER).delete()


class Viewer:
    def __init__(self, url: str, headers: dict[str, str], gpu_id: int) -> None:
        self.url, self.headers, self.gpu_id = url, headers, gpu_id
        self.seen: dict[int, float] = {}  # utilisation value -> arrival (perf_counter)
        self.ready = asyncio.Event()
        self.frames = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with connect(self.url, additional_headers=self.headers, open_timeout=60, max_size=2**24) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "gpus", first
            self.ready.set()
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                now = time.perf_counter()
                self.frames += 1
                for g in json.loads(raw).get("gpus", []):
                    if g["id"] == self.gpu_id and g["utilization_pct"] not in self.seen:
                        self.seen[g["utilization_pct"]] = now


def commit_change(gpu_id: int, node_id: int, value: int) -> float:
    with transaction.atomic():
        GPU.objects.filter(pk=gpu_id).update(utilization_pct=value)
        live.gpus_changed([node_id])  # queued; sent right after the commit below
        # on_commit hooks run inside the atomic block's exit, after COMMIT returns;
        # the commit time is taken by the first hook.
        committed: list[float] = []
        transaction.on_commit(lambda: committed.append(time.perf_counter()))
    return committed[0]


async def measure(args, host: str, session: str, node: Node, gpu: GPU) -> dict:
    headers = {"Cookie": f"sessionid={session}", "Origin": f"http://{host}"}
    viewers = [Viewer(f"ws://{host}/ws/cluster/", headers, gpu.pk) for _ in range(args.viewers)]
    stop = asyncio.Event()
    tasks = []
    for i, v in enumerate(viewers):
        tasks.append(asyncio.create_task(v.run(stop)))
        if i % 20 == 19:
            await asyncio.sleep(0.05)  # don't stampede the handshake queue
    await asyncio.wait_for(asyncio.gather(*(v.ready.wait() for v in viewers)), 120)

    commits: dict[int, float] = {}
    values = list(range(1, 101))[: args.rounds]
    for value in values:
        commits[value] = await sync_to_async(commit_change, thread_sensitive=False)(gpu.pk, node.pk, value)
        await asyncio.sleep(args.interval)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(len(v.seen) < len(values) for v in viewers):
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    # Values only grow, and a viewer's frames are coalesced: a commit is on screen when
    # its value or a later one is (a newer frame supersedes it).
    def on_screen(v: Viewer, value: int) -> float | None:
        times = [t for seen, t in v.seen.items() if seen >= value]
        return min(times) if times else None

    arrivals = [(on_screen(v, value), commits[value]) for v in viewers for value in values]
    latencies = [(t - c) * 1000 for t, c in arrivals if t is not None]
    missed = sum(1 for t, _ in arrivals if t is None)
    qs = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0]] * 99
    return {
        "viewers": args.viewers, "rounds": len(values), "layer": "redis" if args.redis_url else "postgres",
        "commit_to_screen_ms_p50": round(statistics.median(latencies), 1),
        "commit_to_screen_ms_p95": round(qs[94], 1), "commit_to_screen_ms_max": round(max(latencies), 1),
        "updates_missed": missed, "frames_per_viewer": round(statistics.mean(v.frames for v in viewers), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds instead of 60 (well under 3 minutes)")
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between commits (default 0.5)")
    parser.add_argument("--redis", action="store_true", help="use Redis (REDIS_URL or redis://127.0.0.1:6379/0)")
    args = parser.parse_args()
    if args.viewers < 1 or (args.rounds is not None and not 1 <= args.rounds <= 100):
        parser.error("--viewers must be >= 1 and --rounds between 1 and 100")
    args.rounds = args.rounds or (20 if args.quick else 60)
    args.redis_url = (os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0") if args.redis else None
    if args.redis_url:
        from django.conf import settings

        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                               "CONFIG": {"hosts": [args.redis_url]}}}
    elif os.environ.get("REDIS_URL"):
        raise SystemExit("REDIS_URL is set: pass --redis to measure the Redis layer (or unset it)")

    call_command("migrate", interactive=False, verbosity=0)
    node, gpu, session = setup()
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"bench-websocket-{port}.log"
    proc = start_web(port, args.redis_url, log_path)
    try:
        result = asyncio.run(measure(args, f"127.0.0.1:{port}", session, node, gpu))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        cleanup()
    raw = ceilings.notify_round_trip_ms(ceilings.database_url(), 50)
    result["raw_notify_round_trip_ms_p50"] = raw["p50_ms"]
    result["commit_to_screen_ms_p50_ratio"] = ceilings.ratio(result["commit_to_screen_ms_p50"], raw["p50_ms"])
    print(f"raw ceiling: commit + NOTIFY -> a listener's committed answer, p50 {raw['p50_ms']} ms")
    print(f"{result['viewers']} viewers, {result['rounds']} commits, {result['layer']} layer: "
          f"p50 {result['commit_to_screen_ms_p50']} ms, p95 {result['commit_to_screen_ms_p95']} ms, "
          f"missed {result['updates_missed']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
