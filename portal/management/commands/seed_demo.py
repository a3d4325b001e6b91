"""Idempotently create the demo tenant, its quota and the demo servers' join token.

The two 8-GPU demo servers are not written here: ``make run`` starts their
(simulated) agents, which enrol with the cluster join token written to
``var/agents/<database>/join-token`` and report their GPUs, the same way a real
GPU server joins.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connection, transaction

from nodes.enrolment import find_join_token, issue_join_token
from tenants.choices import Priority
from tenants.models import Quota, Tenant

DEMO_SERVERS = ("demo-gpu-01", "demo-gpu-02")
DEMO_GPU_SPEC = "8xH100-80GB"
DEMO_GPU_MODEL = "NVIDIA H100 80GB HBM3"
DEMO_GPU_MEMORY_MB = 81_559


def demo_agents_dir() -> Path:
    """Per database, so agents of a test run never reuse a development run's tokens."""
    return Path(settings.BASE_DIR) / "var" / "agents" / connection.settings_dict["NAME"]


def ensure_join_token(path: Path) -> bool:
    """Keep the token in ``path`` if it is still valid here, else write a new one (0600).
    Returns True when a new token was made."""
    try:
        current = path.read_text().strip()
    except OSError:
        current = ""
    if current and find_join_token(current) is not None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(issue_join_token(note="demo agents (seed_demo)") + "\n")
    return True


class Command(BaseCommand):
    help = "Create the demo tenant (with a quota) and a cluster join token for the demo agents; safe to re-run."

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        tenant, created = Tenant.objects.get_or_create(
            slug="demo", defaults={"name": "Demo lab", "description": "Created by seed_demo."}
        )
        Quota.objects.get_or_create(
            tenant=tenant,
            defaults={"max_gpus": 8, "max_gpu_memory_mb": 8 * DEMO_GPU_MEMORY_MB, "max_running_tasks": 16,
                      "max_pending_tasks": 1000, "max_priority": Priority.HIGH},
        )
        token_file = demo_agents_dir() / "join-token"
        new_token = ensure_join_token(token_file)
        verb = "created" if created else "kept"
        self.stdout.write(f"demo tenant {verb}; join token for the demo agents "
                          f"{'written to' if new_token else 'kept in'} {token_file}")
