"""``make run``: the whole system on one machine, in the foreground.

Migrates, makes sure an admin exists (a generated password, printed once),
seeds the demo data, then starts and supervises the processes: the daphne web
server (with ``portal.webserver``'s connection pool), the scheduler (runscheduler),
the django-q2 cluster and the simulated GPU agents. Ctrl-C or
SIGTERM stops them all, and the embedded PostgreSQL if this run started it.

The children stay in this command's process group, and each is told by the kernel
(``PR_SET_PDEATHSIG``) to stop when this command dies: however ``make run`` is
stopped (Ctrl-C, SIGTERM to its process group then SIGKILL, or a SIGKILL of this
process alone), nothing it started (the q cluster's workers included) outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from nodes.enrolment import allow_reenrolment
from nodes.models import Node
from portal import webserver
from portal.management.commands.seed_demo import DEMO_GPU_SPEC, DEMO_SERVERS, demo_agents_dir

BASE_DIR = Path(settings.BASE_DIR)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the shared process group still covers make's stop
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Command(BaseCommand):
    help = "Start the portal, scheduler and simulated GPU servers for development (make run)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-seed", action="store_true", help="skip the demo tenant and servers")

    def handle(self, *args, host: str, port: int, no_seed: bool, **options) -> None:
        if not _port_free(host, port):
            raise CommandError(f"port {port} on {host} is already in use; stop that process or set PORT=8001")
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("database migrated")
        self._ensure_admin()
        self.no_seed = no_seed
        if not no_seed:
            call_command("seed_demo", stdout=self.stdout)
        call_command("collectstatic", interactive=False, verbosity=0)

        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for name, argv in self._processes(host, port):
                if self.stop_requested:
                    break
                self._start(name, argv)
            if self._wait_for_web(host, port, 30):
                self.stdout.write(self.style.SUCCESS(f"portal ready: http://{host}:{port}/admin/  (Ctrl-C stops)"))
                self._supervise()
            self.stdout.write("stopping...")
        finally:
            self._stop_all()

    def _processes(self, host: str, port: int) -> list[tuple[str, list[str]]]:
        python = sys.executable
        manage = str(BASE_DIR / "manage.py")
        return [
            # daphne, not portal.webserver's granian: granian's main process did not stop its
            # workers on SIGTERM, and make run must leave nothing behind when it is killed.
            ("web", [python, "-m", "daphne", "-b", host, "-p", str(port), "portal.asgi:application"]),
            *self._extra_processes(python, manage, host, port),
        ]

    def _extra_processes(self, python: str, manage: str, host: str, port: int) -> list[tuple[str, list[str]]]:
        return [
            # Passes woken by LISTEN/NOTIFY, plus the every-second sweep.
            ("scheduler", [python, manage, "runscheduler"]),
            # django-q2 workers: event-triggered passes and the every-minute sweep schedule.
            ("qcluster", [python, manage, "qcluster"]),
            *self._demo_agents(python, host, port),
        ]

    def _demo_agents(self, python: str, host: str, port: int) -> list[tuple[str, list[str]]]:
        """Two simulated 8-GPU servers, enrolled with seed_demo's cluster join token."""

        base = demo_agents_dir()
        if getattr(self, "no_seed", False) or not (base / "join-token").exists():
            return []  # --no-seed: no demo servers
        portal = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        # As root, demo tasks run as mapped accounts (nobody here); a developer's own
        # account is the host's one user.
        accounts = ["--single-user-host"] if os.geteuid() != 0 else []

        enrolled = {n.name: n for n in Node.objects.filter(name__in=DEMO_SERVERS, token_prefix__isnull=False)}
        agents = []
        for name in DEMO_SERVERS:
            # Each server holds its own copy of the join token: its agent removes it once spent.
            # A node token left from an earlier database is dropped; a demo server whose agent
            # lost its token is allowed to enrol again (what an operator does in the admin).
            token, saved = base / f"join-token-{name}", base / name / "node_token"
            if name not in enrolled:
                saved.unlink(missing_ok=True)
            elif not saved.exists():
                allow_reenrolment(enrolled[name])
            if not saved.exists():
                shutil.copyfile(base / "join-token", token)
            agents.append((name, [python, "-m", "nodes.agent", "--portal", portal, "--name", name,
                                  "--simulate", DEMO_GPU_SPEC, "--state-dir", str(base / name),
                                  "--work-root", str(base / "task-work"), "--join-token-file", str(token),
                                  "--grace-period", "3", "--kill-tasks-on-exit", *accounts]))
        return agents

    def _ensure_admin(self) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("admin user exists (reset its password: .venv/bin/python manage.py changepassword admin)")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "admin@localhost", password)
        self.stdout.write(self.style.WARNING(f"created admin user: admin / {password}   (shown once; save it)"))

    def _start(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "PORTAL_PROCESS_NAME": f"gpu-portal-{name}",
               "SERVE_STATIC": os.environ.get("SERVE_STATIC", "true")}
        if name == "web":
            env = webserver.env(env)
        parent = os.getpid()
        # Same process group (a stop of `make run` reaches every descendant), and
        # stopped by the kernel should this process die first.
        proc = subprocess.Popen(argv, cwd=BASE_DIR, env=env, preexec_fn=lambda: _die_with_parent(parent))
        self.children.append((name, proc))
        self.stdout.write(f"started {name} (pid {proc.pid})")

    def _on_signal(self, signum, frame) -> None:
        # Only recorded; the start loop, the wait for the web server and the supervision loop
        # look at it. An exception raised here would surface wherever the main thread happened
        # to be: inside Popen between fork and its return (that child would then run
        # untracked), or inside a callback whose exceptions Python prints and drops (logging's
        # after-fork lock release), and then the stop was lost and devrun went on starting.
        self.stop_requested = True

    def _wait_for_web(self, host: str, port: int, timeout: float) -> bool:
        """True once the web server accepts connections; False if a stop came first."""
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host, port)) == 0:
                    return True
            if time.monotonic() > deadline:
                raise CommandError(f"the web server did not start within {timeout:.0f} s; see its output above")
            time.sleep(0.2)
        return False

    def _supervise(self) -> None:
        """Until a stop is asked for; a child that exits meanwhile stops everything."""
        while not self.stop_requested:
            for name, proc in self.children:
                code = proc.poll()
                if code is not None:
                    raise CommandError(f"{name} exited with code {code}; stopping everything")
            time.sleep(0.2)

    def _stop_all(self) -> None:
        import psutil

        for _, proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for name, proc in self.children:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                # Its whole tree (a q cluster's workers too): they share our process group.
                self.stdout.write(f"{name} did not stop within 10 s; killing it")
                try:
                    tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
                except psutil.NoSuchProcess:
                    continue
                for p in tree:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
                proc.wait(5)
