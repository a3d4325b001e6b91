"""Command line and main loop of the GPU server agent (``python -m nodes.agent``).

Three loops share one asyncio event loop:
- heartbeat: every interval, read all GPUs through NVML and report them;
- watch: keep a websocket open for pushed assignments, falling back to an HTTP
  long poll while it is down; every snapshot is reconciled by the runner;
- supervise: reap exits, enforce timeouts and kill grace periods, ship log
  increments, and send start/finish reports until the portal acknowledges them.

At most one copy of a task runs: every heartbeat answer carries the etag of the
tasks the portal assigns here, and a mismatch fetches the list at once, so a copy
the portal requeued elsewhere is killed as soon as this agent is heard from. An
agent cut off from every portal URL for longer than its lease (``agent_lease_s``,
well above the portal's server-lost timeout) stops its tasks by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nodes.agent import __version__
from nodes.agent.accounts import AccountPolicy
from nodes.agent.gpus import GPUReader, NoDriver, SpecError, load_nvml
from nodes.agent.portal import PortalClient, PortalUnreachable
from nodes.agent.runner import LocalTask, Runner

log = logging.getLogger("gpu-agent")

LONG_POLL_S = 20
# Until a portal says otherwise (scheduler.agent_lease_s in every heartbeat answer).
DEFAULT_LEASE_S = 900.0


class Fatal(Exception):
    """Stops the agent with one readable line and exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nodes.agent", description="GPU server agent of the GPU portal.")
    p.add_argument("--portal", action="append", required=True, metavar="URL",
                   help="portal base URL, e.g. https://portal.example.com; repeat (or comma-separate) for failover")
    p.add_argument("--name", default=socket.gethostname(), help="server name to register (default: hostname)")
    p.add_argument("--state-dir", default=os.environ.get("GPU_AGENT_STATE_DIR", "/var/lib/gpu-agent"),
                   help="node token, task logs and task state (default /var/lib/gpu-agent)")
    p.add_argument("--join-token", default=os.environ.get("GPU_AGENT_JOIN_TOKEN"),
                   help="join token for the first start (or GPU_AGENT_JOIN_TOKEN)")
    p.add_argument("--join-token-file", help="read the join token from this file")
    p.add_argument("--simulate", metavar="SPEC", help="simulated GPUs instead of NVML, e.g. 8xH100-80GB")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between heartbeats (default: what the portal says)")
    p.add_argument("--grace-period", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when a task is cancelled or times out (default 10)")
    p.add_argument("--keep-task-dirs-hours", type=float, default=24.0,
                   help="remove finished tasks' logs after this many hours (default 24)")
    p.add_argument("--kill-tasks-on-exit", action="store_true",
                   help="stop running tasks when the agent stops (default: leave them; a restart reattaches)")
    p.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                   help="stop all tasks after this long without a successful heartbeat to any portal "
                        "(default: what the portal says, 900 s before the first answer)")
    p.add_argument("--log-level", default="INFO")
    iso = p.add_argument_group("task accounts (see the README's security model)")
    iso.add_argument("--work-root", default=os.environ.get("GPU_AGENT_WORK_ROOT", "/var/lib/gpu-agent-tasks"),
                     help="tasks' own working directories, outside the state dir (default /var/lib/gpu-agent-tasks)")
    iso.add_argument("--no-user-accounts", dest="map_users", action="store_false",
                     help="do not run tasks as the account named like the submitting portal user")
    iso.add_argument("--tenant-account", default="gpu-{tenant}", metavar="FORMAT",
                     help="per-tenant account name, {tenant} is the tenant's slug (default gpu-{tenant}; '' off)")
    iso.add_argument("--fallback-account", default="nobody", metavar="NAME",
                     help="account for tasks no other rule maps (default nobody; '' refuses such tasks)")
    iso.add_argument("--min-task-uid", type=int, default=1000,
                     help="user and tenant accounts below this uid are never used (default 1000)")
    iso.add_argument("--single-user-host", action="store_true",
                     help="for an agent that is not root on a host serving only its account: tasks run as that "
                          "account (without it such an agent refuses to start)")
    args = p.parse_args(argv)
    try:
        args.tenant_account.format(tenant="t")
    except (KeyError, IndexError, ValueError):
        p.error(f"--tenant-account {args.tenant_account!r}: the only placeholder is {{tenant}}")
    args.portal = [u.strip() for value in args.portal for u in value.split(",") if u.strip()]
    for url in args.portal:
        if not url.startswith(("http://", "https://")):
            p.error(f"--portal {url!r}: must start with http:// or https://")
    if args.heartbeat_interval is not None and args.heartbeat_interval <= 0:
        p.error("--heartbeat-interval must be positive")
    if args.lease is not None and args.lease <= 0:
        p.error("--lease must be positive")
    return args


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir)
        self.name = args.name
        self.portal = PortalClient(args.portal, user_agent=f"gpu-agent/{__version__}")
        self.gpus = GPUReader(load_nvml(args.simulate, name=args.name, sim_dir=str(self.state_dir / "sim")))
        self.runner: Runner | None = None
        self.stopping = asyncio.Event()
        self.wake_supervisor = asyncio.Event()
        self.fetch_now = asyncio.Event()
        self.interval = args.heartbeat_interval or 10.0
        self.accounts = AccountPolicy(map_users=args.map_users, tenant_format=args.tenant_account,
                                      fallback=args.fallback_account, min_uid=args.min_task_uid,
                                      single_user_host=args.single_user_host)
        self.etag = ""
        self.ws_connected = False
        self.lease_s = args.lease or DEFAULT_LEASE_S
        self.last_heard = time.monotonic()  # last heartbeat a portal accepted (start counts)
        self.fenced = False

    # --- enrolment -----------------------------------------------------------------
    @property
    def token_file(self) -> Path:
        return self.state_dir / "node_token"

    def join_token(self) -> str | None:
        if self.args.join_token_file:
            try:
                return Path(self.args.join_token_file).read_text().strip() or None
            except OSError as exc:
                raise Fatal(f"cannot read --join-token-file {self.args.join_token_file}: {exc.strerror}") from None
        return self.args.join_token

    def load_token(self) -> bool:
        try:
            saved = json.loads(self.token_file.read_text())
        except (OSError, ValueError):
            return False
        self.portal.token, self.name = saved["token"], saved["name"]
        return True

    def save_token(self, token: str, name: str) -> None:
        tmp = self.token_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"token": token, "name": name}, f)
        os.chmod(tmp, 0o600)
        tmp.replace(self.token_file)

    async def enrol(self) -> None:
        secret = self.join_token()
        if not secret:
            raise Fatal(f"not enrolled yet ({self.token_file} is missing): give --join-token or --join-token-file")
        while not self.stopping.is_set():
            try:
                response = await self.portal.request(
                    "POST", "/register", auth=False,
                    json={"join_token": secret, "name": self.args.name, "hostname": socket.gethostname(),
                          "agent_version": __version__},
                )
            except PortalUnreachable as exc:
                log.warning("registration: no portal answered (%s); retrying", exc)
                await self.sleep(2)
                continue
            if response.status_code == 201:
                body = response.json()
                self.portal.token, self.name = body["node_token"], body["name"]
                self.save_token(self.portal.token, self.name)
                log.info("enrolled as server %s (id %s)", self.name, body["node_id"])
                self.consume_join_token()
                return
            if response.status_code == 429:
                await self.sleep(5)
                continue
            raise Fatal(f"registration refused (HTTP {response.status_code}): {self._detail(response)}")

    def consume_join_token(self) -> None:
        """The join token has done its one job: it leaves the host, so nothing running
        here (a task included) can enrol a server with it again."""
        if self.args.join_token_file:
            try:
                os.unlink(self.args.join_token_file)
                log.info("removed the spent join token file %s", self.args.join_token_file)
            except OSError as exc:
                log.warning("could not remove the join token file %s: %s; remove it by hand",
                            self.args.join_token_file, exc.strerror)
        self.args.join_token_file = self.args.join_token = None
        os.environ.pop("GPU_AGENT_JOIN_TOKEN", None)

    async def token_rejected(self) -> None:
        log.warning("the portal rejected the node token")
        self.portal.token = None
        if not self.join_token():
            raise Fatal("the portal rejected this server's node token; re-enrol with a new --join-token")
        await self.enrol()

    @staticmethod
    def _detail(response) -> str:
        try:
            return json.dumps(response.json())[:300]
        except ValueError:
            return response.text[:300]

    # --- loops -----------------------------------------------------------------------
    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                await self.heartbeat()
            except PortalUnreachable as exc:
                log.warning("heartbeat: no portal answered (%s)", exc)
            self.check_lease()
            await self.sleep(max(self.interval - (time.monotonic() - started), 0.05))

    def check_lease(self) -> None:
        """Cut off from every portal for longer than the lease: the portal has declared
        this server lost long ago and may run its tasks elsewhere, so stop them."""
        silent = time.monotonic() - self.last_heard
        if silent <= self.lease_s or self.fenced or self.runner is None:
            return
        self.fenced = True
        stopped = self.runner.fence(f"the agent on {self.name} heard no portal for {silent:.0f} s "
                                    f"(lease {self.lease_s:.0f} s)")
        log.error("no portal accepted a heartbeat for %.0f s (lease %.0f s): stopping %d task(s)", silent,
                  self.lease_s, len(stopped))
        self.wake_supervisor.set()

    async def heartbeat(self) -> None:
        gpus = self.gpus.sample()
        body = {"name": self.name, "hostname": socket.gethostname(), "agent_version": __version__, "gpus": gpus}
        response = await self.portal.request("POST", "/heartbeat", json=body)
        if response.status_code == 401:
            await self.token_rejected()
            return
        if response.status_code != 200:
            log.error("heartbeat refused (HTTP %s): %s", response.status_code, self._detail(response))
            return
        answer = response.json()
        self.last_heard = time.monotonic()
        if self.fenced:
            log.info("a portal accepts heartbeats again: the lease is renewed")
            self.fenced = False
        if self.args.lease is None and answer.get("agent_lease_s"):
            self.lease_s = float(answer["agent_lease_s"])
        if self.args.heartbeat_interval is None:
            self.interval = float(answer["heartbeat_interval_s"])
        if answer.get("cordoned"):
            log.warning("the portal cordoned GPU(s) %s after errors", ", ".join(answer["cordoned"]))
        if answer.get("assignments_etag") != self.etag:
            self.fetch_now.set()  # a push was missed (or is in flight): ask

    def apply(self, state: dict[str, Any]) -> None:
        assert self.runner is not None
        started = self.runner.reconcile(state)
        self.etag = state["etag"]
        if started or any(t.removed for t in self.runner.tasks.values()):
            self.wake_supervisor.set()

    async def fetch_assignments(self, wait: float) -> None:
        response = await self.portal.request("GET", "/assignments", params={"known": self.etag, "wait": wait},
                                             timeout=wait + 10)
        if response.status_code == 401:
            await self.token_rejected()
        elif response.status_code == 200:
            self.apply(response.json())
        else:
            log.warning("assignments: HTTP %s %s", response.status_code, self._detail(response))
            await self.sleep(2)

    async def watch_loop(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        while not self.stopping.is_set():
            try:
                async with connect(self.portal.ws_url(), additional_headers=self.portal.auth_headers(),
                                   origin=self.portal.origin(), proxy=None, open_timeout=5,
                                   ping_interval=20, ping_timeout=20) as ws:
                    self.ws_connected = True
                    log.info("websocket connected to %s", self.portal.base)
                    async for raw in ws:
                        message = json.loads(raw)
                        if message.get("type") == "assignments":
                            self.apply(message)
            except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
                if self.stopping.is_set():
                    return
                detail = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else repr(exc)
                log.warning("websocket to %s down (%s); long-polling meanwhile", self.portal.base, detail)
                if not isinstance(exc, InvalidStatus):
                    self.portal.failover("websocket failed")
            finally:
                self.ws_connected = False
            try:
                await self.fetch_assignments(wait=LONG_POLL_S)
            except PortalUnreachable as exc:
                log.warning("assignments: no portal answered (%s)", exc)
                await self.sleep(1)

    async def fetch_loop(self) -> None:
        """Fetch at once when a heartbeat shows a missed change."""
        while not self.stopping.is_set():
            await self.fetch_now.wait()
            self.fetch_now.clear()
            with contextlib.suppress(PortalUnreachable):
                await self.fetch_assignments(wait=0)

    async def supervise_loop(self) -> None:
        assert self.runner is not None
        last_prune = 0.0
        while not self.stopping.is_set():
            self.runner.poll()
            try:
                await self.report_all()
            except PortalUnreachable as exc:
                log.warning("reports: no portal answered (%s)", exc)
                await self.sleep(1)
            if time.monotonic() - last_prune > 600:
                self.runner.prune(self.args.keep_task_dirs_hours * 3600)
                last_prune = time.monotonic()
            self.wake_supervisor.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake_supervisor.wait(), 0.2)

    async def report_all(self) -> None:
        assert self.runner is not None
        for task in list(self.runner.tasks.values()):
            if task.done:
                continue
            if not task.reported_started and task.state != "starting" and task.pid:
                await self.report(task, {"event": "started"})
                task.reported_started = True
                self.runner.save(task)
            await self.ship_logs(task)
            if task.state == "exited" and not task.reported_finished:
                if task.removed and not task.lost:
                    pass  # the portal already ended it (cancel, timeout sweep, requeue)
                elif task.lost:
                    await self.report(task, {"event": "finished", "lost": True, "reason": task.reason})
                else:
                    await self.report(task, {
                        "event": "finished", "exit_code": task.exit_code, "oom": task.oom,
                        "timed_out": task.timed_out, "reason": task.reason if task.timed_out or
                        task.exit_code == 127 else "",
                        "duration_s": max(task.ended_at - task.started_at, 0) if task.started_at else None,
                    })
                task.reported_finished = True
                self.runner.save(task)

    async def report(self, task: LocalTask, event: dict[str, Any]) -> None:
        response = await self.portal.request("POST", f"/tasks/{task.id}/events",
                                             json={"attempt": task.attempt, **event})
        if response.status_code == 401:
            await self.token_rejected()
            raise PortalUnreachable("re-enrolled; report again")
        if response.status_code >= 500 or response.status_code == 429:
            raise PortalUnreachable(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            # 404/409: the task is gone or no longer ours; nothing a retry can change.
            log.warning("task %s: %s report refused: %s", task.id, event["event"], self._detail(response))

    async def ship_logs(self, task: LocalTask) -> None:
        assert self.runner is not None
        for _ in range(8):
            chunk = self.runner.next_log_chunk(task)
            if chunk is None:
                return
            offset, text, size = chunk
            response = await self.portal.request("POST", f"/tasks/{task.id}/logs", json={
                "chunks": [{"attempt": task.attempt, "offset": offset, "data": text}]})
            if response.status_code in (429,) or response.status_code >= 500:
                raise PortalUnreachable(f"HTTP {response.status_code}")
            end = offset + size
            if response.status_code == 200:
                # The portal may already hold a shorter chunk at this offset (we crashed
                # after sending it): continue from its end, so nothing is lost.
                end = response.json().get("ends", {}).get(f"{task.attempt}:{offset}", end)
            elif response.status_code not in (404, 409):
                log.warning("task %s: log chunk refused: %s", task.id, self._detail(response))
            task.shipped_offset = end
            self.runner.save(task)

    # --- main --------------------------------------------------------------------------
    def prepare_host(self) -> None:
        """Refuse what would let a task reach the agent's credentials; lock the state dir."""
        refusal = self.accounts.check_agent(os.geteuid())
        if refusal:
            raise Fatal(refusal)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # node token, task env and logs: the agent's alone
        work_root = Path(self.args.work_root).resolve()
        if work_root.is_relative_to(self.state_dir.resolve()):
            raise Fatal(f"--work-root {self.args.work_root} must lie outside the state dir {self.state_dir}")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.prepare_host()
        try:
            self.gpus.open()
        except NoDriver as exc:
            raise Fatal(f"{exc} (use --simulate 8xH100-80GB to run without GPUs)") from None
        if not self.load_token():
            await self.enrol()
        log.info("server %s: %d GPU(s), driver %s, portals %s", self.name, len(self.gpus.handles),
                 self.gpus.driver_version or "?", ", ".join(self.portal.urls))
        self.runner = Runner(self.state_dir, server_name=self.name, grace_s=self.args.grace_period,
                             work_root=Path(self.args.work_root), accounts=self.accounts)
        self.runner.load()
        loops = [asyncio.create_task(c) for c in
                 (self.heartbeat_loop(), self.watch_loop(), self.fetch_loop(), self.supervise_loop())]
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([*loops, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for task in done:
            if task is not stop and task.exception() is not None:
                raise task.exception()
        if self.args.kill_tasks_on_exit:
            self.runner.stop_all()
        await self.portal.close()
        self.gpus.close()
        log.info("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s gpu-agent[{args.name}] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    try:
        return asyncio.run(Agent(args).run())
    except (Fatal, SpecError) as exc:
        print(f"gpu-agent: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"gpu-agent: {exc.name or exc} is not installed (pip install nvidia-ml-py httpx websockets)",
              file=sys.stderr)
        return 2
