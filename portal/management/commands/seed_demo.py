"""Idempotently create the demo tenant, its quota and two 8-GPU demo servers."""

from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand
from django.db import transaction

from nodes.models import GPU, Node, NodeStatus
from scheduling.choices import Priority
from tenants.models import Quota, Tenant

DEMO_SERVERS = ("demo-gpu-01", "demo-gpu-02")
DEMO_GPU_MODEL = "NVIDIA H100 80GB HBM3"
DEMO_GPU_MEMORY_MB = 81_559


class Command(BaseCommand):
    help = "Create the demo tenant (with a quota) and two demo GPU servers with 8 GPUs each; safe to re-run."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--gpus", type=int, default=8, help="GPUs per demo server (default 8)")

    @transaction.atomic
    def handle(self, *args, gpus: int, **options) -> None:
        tenant, created = Tenant.objects.get_or_create(
            slug="demo", defaults={"name": "Demo lab", "description": "Created by seed_demo."}
        )
        Quota.objects.get_or_create(
            tenant=tenant,
            defaults={"max_gpus": 8, "max_gpu_memory_mb": 8 * DEMO_GPU_MEMORY_MB, "max_running_tasks": 16,
                      "max_pending_tasks": 1000, "max_priority": Priority.HIGH},
        )
        made = 0
        for name in DEMO_SERVERS:
            node, _ = Node.objects.get_or_create(
                name=name, defaults={"hostname": f"{name}.local", "labels": {"demo": "yes"},
                                     "status": NodeStatus.ACTIVE},
            )
            for index in range(gpus):
                _, gpu_created = GPU.objects.get_or_create(
                    node=node, index=index,
                    defaults={"uuid": f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{name}/{index}')}",
                              "model_name": DEMO_GPU_MODEL, "memory_total_mb": DEMO_GPU_MEMORY_MB},
                )
                made += gpu_created
        verb = "created" if created else "kept"
        self.stdout.write(f"demo tenant {verb}; {len(DEMO_SERVERS)} demo servers, {made} new GPUs")
