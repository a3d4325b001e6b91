"""run.sh's helper: ``seed`` (Django side) and ``drive`` (the user's side, HTTP only).

``seed`` does what an operator does in the admin: a tenant with a quota, a user in it,
that user's API token, and a cluster join token for the agent (``manage.py join_token``).

``drive`` is a user of the running system: it waits for the agent's GPU to show in
``gpuctl gpus``, submits the torch job with ``gpuctl submit``, follows it through the
REST API (sampling ``/api/v1/gpus``, i.e. what the agent reported through NVML, every
second), fetches its log with ``gpuctl logs`` and checks the job's own report.

Every failure ends with one line, ``device-check: FAIL: ...``, and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"succeeded", "failed", "cancelled", "timed_out"}


class Failed(Exception):
    pass


# --- seed ------------------------------------------------------------------------------------


def seed(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from portal.api.authentication import create_token
    from tenants.models import Membership, Quota, Tenant

    tenant = Tenant.objects.create(name="Device check", slug=args.tenant)
    Quota.objects.create(tenant=tenant, max_gpus=8, max_gpu_memory_mb=8 * 150_000, max_running_tasks=4)
    user = get_user_model().objects.create_user(args.user)
    Membership.objects.create(user=user, tenant=tenant, role=Membership.Role.MEMBER)
    _, secret = create_token(user, "device check")
    write_private(Path(args.token_file), secret)
    call_command("join_token", output=args.join_token_file, note="device check agent")


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


# --- drive -----------------------------------------------------------------------------------


class Portal:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token

    def get(self, path: str, auth: bool = True):
        request = urllib.request.Request(f"{self.url}{path}")  # noqa: S310 (loopback)
        if auth:
            request.add_header("Authorization", f"Token {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return json.loads(response.read())

    def gpuctl(self, *argv: str) -> str:
        env = {**os.environ, "GPUCTL_URL": self.url, "GPUCTL_TOKEN": self.token}
        result = subprocess.run([sys.executable, str(ROOT / "cli" / "gpuctl.py"), *argv], env=env,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise Failed(f"gpuctl {argv[0]}: {(result.stderr or result.stdout).strip()[-300:]}")
        return result.stdout


def wait_until(what: str, timeout: float, probe):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (OSError, urllib.error.URLError, ValueError, Failed) as exc:
            found, last = None, exc
        if found:
            return found
        time.sleep(0.5)
    raise Failed(f"{what} within {timeout:.0f} s" + (f" (last error: {last})" if last else ""))


def drive(args: argparse.Namespace) -> dict:
    portal = Portal(args.url, Path(args.token_file).read_text().strip())
    summary: dict = {"simulate": args.simulate, "server": args.server}
    t0 = time.monotonic() - args.elapsed  # run.sh's clock: its steps and ours read alike

    def mark(step: str) -> None:
        summary.setdefault("timings_s", {})[step] = round(time.monotonic() - t0, 1)
        print(f"device-check: {step} (+{time.monotonic() - t0:.0f} s)", flush=True)

    try:
        wait_until("the portal did not answer /api/v1/health", 60, lambda: portal.get("/api/v1/health", auth=False))

        def registered():
            gpus = json.loads(portal.gpuctl("gpus", "--json", "--server", args.server))
            return gpus if gpus and gpus[0].get("memory_total_mb") else None

        gpus = wait_until(f"the agent did not register server {args.server}'s GPUs", 90, registered)
        summary["gpus_registered"] = gpus
        mark(f"server {args.server} registered {len(gpus)} GPU(s): {gpus[0]['model_name']}, "
             f"{gpus[0]['memory_total_mb']} MiB")
        if len(gpus) != 1:
            raise Failed(f"expected the machine's one GPU, the agent reported {len(gpus)}")
        if "H200" not in gpus[0]["model_name"]:
            raise Failed(f"the registered GPU is {gpus[0]['model_name']!r}, not an H200")
        if not 130_000 <= gpus[0]["memory_total_mb"] <= 150_000:
            raise Failed(f"the registered GPU has {gpus[0]['memory_total_mb']} MiB, not about 140 GiB")
        if args.nvidia_smi:  # uuid, name, memory, driver, compute mode
            summary["nvidia_smi"] = args.nvidia_smi
            uuid = args.nvidia_smi.split(",")[0].strip()
            if gpus[0]["uuid"] != uuid:
                raise Failed(f"the agent registered GPU {gpus[0]['uuid']}, but nvidia-smi shows {uuid}")
        if gpus[0]["state"] != "free":
            # Not worth waiting for: the job would stay pending (a cordon, an error, a reservation).
            raise Failed(f"the registered GPU is {gpus[0]['state']} (health {gpus[0]['health']}, "
                         f"{gpus[0]['cordon_reason'] or 'no cordon reason'}): no task can start on it")
        baseline = gpus[0]["memory_used_mb"]

        command = [args.task_python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", args.job]
        # online: of a one-GPU cluster the default 70/30 split leaves batch work round(0.3) = 0 GPUs.
        submit = ["submit", "--json", "--gpus", "1", "--class", "online", "--timeout", "300",
                  "--name", "device-check-ddp", *[f"--env={e}" for e in args.env], "--", *command]
        task = json.loads(portal.gpuctl(*submit))
        task_id = task["id"]
        summary["task_id"], summary["command"] = task_id, task["command"]
        mark(f"submitted task {task_id} as {task['submitter']!r}")

        samples, seen, status = [], [], task["status"]
        deadline = time.monotonic() + args.timeout
        while status not in FINAL:
            if time.monotonic() > deadline:
                raise Failed(f"task {task_id} still {status} after {args.timeout} s "
                             f"(pending reason: {task.get('pending_reason') or '-'})")
            time.sleep(1)
            task = portal.get(f"/api/v1/tasks/{task_id}")
            status = task["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
                mark(f"task {task_id} {status}")
            if status == "running":
                gpu = portal.get(f"/api/v1/gpus?server={args.server}")
                gpu = (gpu.get("results", gpu) if isinstance(gpu, dict) else gpu)[0]
                samples.append({"t": round(time.monotonic() - t0, 1), "memory_used_mb": gpu["memory_used_mb"],
                                "utilization_pct": gpu["utilization_pct"], "state": gpu["state"]})
        summary["task"] = task
        summary["statuses"] = seen
        summary["events"] = portal.get(f"/api/v1/tasks/{task_id}/events")
        summary["gpu_samples_while_running"] = samples
        peak = max((s["memory_used_mb"] for s in samples), default=None)
        summary["gpu_memory_used_mb"] = {"before": baseline, "peak_while_running": peak}

        log = portal.gpuctl("logs", "--all", str(task_id))
        Path(args.task_log).write_text(log)
        reports = job_reports(log)
        summary["job_reports"] = reports
        if status != "succeeded":
            raise Failed(f"task {task_id} ended {status} (exit code {task.get('exit_code')}, "
                         f"{task.get('failure_reason') or 'no reason'}); {telling_line(log, reports)}")
        check_reports(reports, args.simulate)
        if peak is None or baseline is None or peak < baseline + 4000:
            # NVML readings come with heartbeats: a miss is worth a note, not a failed check.
            summary["warning"] = f"GPU memory used did not visibly rise while the job ran ({baseline} -> {peak} MiB)"
        mark(f"task {task_id} succeeded: {len(reports)} ranks on {reports[0]['device']}, "
             f"GPU memory used {baseline} -> {peak} MiB")
        summary["result"] = "pass"
    except Failed as exc:
        summary["result"], summary["error"] = "fail", str(exc)
        if "task_id" in summary and not Path(args.task_log).exists():
            with contextlib.suppress(Failed, OSError, subprocess.SubprocessError):  # what it printed so far
                Path(args.task_log).write_text(portal.gpuctl("logs", "--all", str(summary["task_id"])))
    except Exception as exc:
        summary["result"], summary["error"] = "fail", f"the driver crashed: {type(exc).__name__}: {exc}"
        raise
    finally:
        Path(args.summary).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def job_reports(log: str) -> list[dict]:
    """Each rank's ``DEVCHECK {json}``, wherever it stands in the log."""
    decoder, reports, at = json.JSONDecoder(), [], 0
    while (at := log.find("DEVCHECK {", at)) >= 0:
        try:
            report, end = decoder.raw_decode(log, at + len("DEVCHECK "))
        except ValueError:
            end = at + 1
        else:
            reports.append(report)
        at = end
    return reports


def telling_line(log: str, reports: list[dict]) -> str:
    """The line of a failed job's log that most likely says why."""
    bad = [r for r in reports if not r.get("ok")]
    if bad:
        return "rank {rank} reported a failed check: {r}".format(rank=bad[0].get("rank"), r=json.dumps(bad[0]))
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in ("DEVCHECK-ERROR", "Error", "error"):
        found = [line for line in lines if marker in line]
        if found:
            return "log: " + found[-1][:300]
    return "last log line: " + (lines[-1][:300] if lines else "(empty)")


def check_reports(reports: list[dict], simulate: bool) -> None:
    if sorted(r["rank"] for r in reports) != [0, 1]:
        raise Failed(f"expected DEVCHECK lines from ranks 0 and 1, got {[r['rank'] for r in reports]}")
    for r in reports:
        if r["world"] != 2 or not r["ok"]:
            raise Failed(f"rank {r['rank']} reported world={r['world']} ok={r['ok']}")
        if r["uid"] == 0:
            raise Failed(f"rank {r['rank']} ran as root: tasks must run as a mapped, unprivileged account")
        if r["cuda_visible_devices"] != "0":
            raise Failed(f"rank {r['rank']} saw CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']!r}, not '0'")
        if not simulate and "H200" not in r["device"]:
            raise Failed(f"rank {r['rank']} ran on {r['device']!r}, not the H200")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check.py")
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--tenant", required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--token-file", required=True)
    s.add_argument("--join-token-file", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--url", required=True)
    d.add_argument("--token-file", required=True)
    d.add_argument("--server", required=True)
    d.add_argument("--task-python", required=True)
    d.add_argument("--job", required=True)
    d.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--timeout", type=float, default=180)
    d.add_argument("--simulate", action="store_true")
    d.add_argument("--nvidia-smi", help="nvidia-smi's line for the GPU: uuid, name, memory, driver, compute mode")
    d.add_argument("--elapsed", type=float, default=0, help="seconds run.sh has run so far")
    d.add_argument("--task-log", required=True)
    d.add_argument("--summary", required=True)
    args = p.parse_args(argv)
    if args.step == "seed":
        seed(args)
        return 0
    summary = drive(args)
    if summary["result"] != "pass":
        print(f"device-check: FAIL: {summary['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
