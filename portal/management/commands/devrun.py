"""``make run``: the whole system on one machine, in the foreground.

Migrates, makes sure an admin exists (a generated password, printed once),
seeds the demo data, then starts and supervises the processes: the web server
(``portal.webserver``: granian, HTTP and websockets on one port), the scheduler
(runscheduler), the django-q2 cluster and simulated GPU agents. Ctrl-C or
SIGTERM stops them all, and the embedded PostgreSQL if this run started it.
"""

from __future__ import annotations

import os
import secrets
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

from portal import webserver

BASE_DIR = Path(settings.BASE_DIR)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


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
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for name, argv in self._processes(host, port):
                self._start(name, argv)
            if not _wait_for_port(host, port, 30):
                raise CommandError("the web server did not start within 30 s; see its output above")
            self.stdout.write(self.style.SUCCESS(f"portal ready: http://{host}:{port}/admin/  (Ctrl-C stops)"))
            self._supervise()
        finally:
            self._stop_all()

    def _processes(self, host: str, port: int) -> list[tuple[str, list[str]]]:
        python = sys.executable
        manage = str(BASE_DIR / "manage.py")
        return [
            ("web", webserver.argv(host, port, python=python)),
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
        from portal.management.commands.seed_demo import DEMO_GPU_SPEC, DEMO_SERVERS, demo_agents_dir

        base = demo_agents_dir()
        if getattr(self, "no_seed", False) or not (base / "join-token").exists():
            return []  # --no-seed: no demo servers
        portal = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        return [
            (name, [python, "-m", "nodes.agent", "--portal", portal, "--name", name, "--simulate", DEMO_GPU_SPEC,
                    "--state-dir", str(base / name), "--join-token-file", str(base / "join-token"),
                    "--grace-period", "3", "--kill-tasks-on-exit"])
            for name in DEMO_SERVERS
        ]

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
        proc = subprocess.Popen(argv, cwd=BASE_DIR, env=env, start_new_session=True)
        self.children.append((name, proc))
        self.stdout.write(f"started {name} (pid {proc.pid})")

    def _on_signal(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def _supervise(self) -> None:
        try:
            while True:
                for name, proc in self.children:
                    code = proc.poll()
                    if code is not None:
                        raise CommandError(f"{name} exited with code {code}; stopping everything")
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stdout.write("stopping...")

    def _stop_all(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.children:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
