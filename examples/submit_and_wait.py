#!/usr/bin/env python3
"""Example client (seed 003): submit N tasks to the portal and wait for all of them.

    .venv/bin/python examples/submit_and_wait.py --tenant acme --tasks 5
    .venv/bin/python examples/submit_and_wait.py --url http://127.0.0.1:8000 --token api_... \\
        --tasks 20 --gpus 1 --mem 16G --priority normal -- python3 "$PWD/examples/deepseek_infer.py" --dry-run

Tasks run in their own directory on the GPU server, not in this repository, so a
script is named by its absolute path (the default command does that for you).

The N tasks go in with ONE request to the batch endpoint (all or none); the
script then polls the task list until every task has ended and prints a summary.
It exits 0 when all succeeded, 1 otherwise. URL and token come from --url/--token,
$GPUCTL_URL/$GPUCTL_TOKEN, or the config file ``gpuctl login`` writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.gpuctl import Client, CliError, load_config, parse_memory

FINAL = {"succeeded", "failed", "cancelled", "timed_out"}
DEEPSEEK = Path(__file__).resolve().parent / "deepseek_infer.py"


def default_command() -> list[str]:
    """The deepseek example's dry run, by absolute path: a task's working directory is
    its own task directory on the GPU server, where a repository-relative path means nothing."""
    return ["python3", str(DEEPSEEK), "--dry-run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--tenant")
    parser.add_argument("--tasks", type=int, default=5, help="how many tasks (1..1000)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--mem", type=parse_memory, help="GPU memory per GPU, e.g. 16G")
    parser.add_argument("--priority", default="NORMAL")
    parser.add_argument("--name", default="example")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between status checks")
    parser.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the command each task runs (default: the deepseek-7b example, dry run)")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"] or default_command()
    if not 1 <= args.tasks <= 1000:
        parser.error("--tasks must be between 1 and 1000")

    config = load_config()
    url = args.url or os.environ.get("GPUCTL_URL") or config.get("url")
    token = args.token or os.environ.get("GPUCTL_TOKEN") or config.get("token")
    if not url or not token:
        print("example: error: give --url and --token (or run gpuctl login first)", file=sys.stderr)
        return 2
    client = Client(url, token)

    spec = {"command": command, "gpu_count": args.gpus, "priority": args.priority, "model_name": "deepseek-7b"}
    if args.tenant:
        spec["tenant"] = args.tenant
    if args.mem:
        spec["gpu_memory_mb"] = args.mem
    try:
        ids = client.post("tasks/batch", {"tasks": [{**spec, "name": f"{args.name}-{i}"}
                                                    for i in range(args.tasks)]})["ids"]
        print(f"submitted {len(ids)} tasks: {ids[0]}..{ids[-1]}", flush=True)
        deadline = time.monotonic() + args.timeout
        wanted = set(ids)
        states: dict[int, dict] = {}
        while True:
            offset = 0
            seen: set[int] = set()
            while True:  # newest first: our tasks are on the first pages
                page = client.get("tasks", limit=500, offset=offset, mine="true")
                for task in page["results"]:
                    if task["id"] in wanted:
                        states[task["id"]] = task
                        seen.add(task["id"])
                offset += len(page["results"])
                if not page["next"] or seen == wanted:
                    break
            done = sum(1 for t in states.values() if t["status"] in FINAL)
            counts: dict[str, int] = {}
            for t in states.values():
                counts[t["status"]] = counts.get(t["status"], 0) + 1
            print(f"{done}/{len(ids)} done  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
            if done == len(ids) and len(states) == len(ids):
                break
            if time.monotonic() > deadline:
                print("example: error: gave up waiting", file=sys.stderr)
                return 1
            time.sleep(args.poll)
    except CliError as exc:
        print(f"example: error: {exc}", file=sys.stderr)
        return 1
    failed = [t for t in states.values() if t["status"] != "succeeded"]
    for t in sorted(failed, key=lambda t: t["id"]):
        print(f"task {t['id']} {t['status']}: {t['failure_reason'] or '-'}")
    print(f"all {len(ids)} tasks ended: {len(ids) - len(failed)} succeeded, {len(failed)} did not")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
