"""Print a new join token: cluster-wide (agents self-register) or for one server."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from nodes.enrolment import issue_join_token
from nodes.models import Node


class Command(BaseCommand):
    help = "Make a join token for GPU server agents and print it once (or write it to a 0600 file)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--server", help="bind the token to this existing server (one use); default: cluster-wide")
        parser.add_argument("--hours", type=float, default=None, help="expire after this many hours (default: never "
                            "for a cluster token, 24 for a server token)")
        parser.add_argument("--note", default="made with manage.py join_token")
        parser.add_argument("--output", help="write the token to this file (mode 0600) instead of printing it")

    def handle(self, *args, server: str | None, hours: float | None, note: str, output: str | None, **options):
        node = None
        if server:
            node = Node.objects.filter(name=server).first()
            if node is None:
                raise CommandError(f"no server named {server!r}; create it in the admin first")
            hours = 24 if hours is None else hours
        if hours is not None and hours <= 0:
            raise CommandError("--hours must be positive")
        secret = issue_join_token(node, note=note, ttl=timedelta(hours=hours) if hours else None)
        if output:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(secret + "\n")
            self.stdout.write(f"join token written to {path}")
        else:
            self.stdout.write(secret)
