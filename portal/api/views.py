"""Cluster-wide views of the API: the control plane, totals, queue depth, health."""

from __future__ import annotations

from django.db import connection
from django.db.models import Count, Q
from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from kernel import control_plane, registry
from kernel.models import ControlPlaneServer
from nodes import inventory
from nodes.models import NodeStatus
from scheduling.choices import OPEN_STATUSES, TaskStatus
from scheduling.models import SchedulerLock, Task
from tenants.choices import Priority

STAFF_ONLY_SERVER_FIELDS = ("hostname", "pid")


def cluster_summary() -> dict:
    servers = [
        {"name": s.name, "role": s.role, "hostname": s.hostname, "pid": s.pid, "version": s.version,
         "started_at": s.started_at, "last_seen_at": s.last_seen_at, "alive": registry.is_alive(s)}
        for s in ControlPlaneServer.objects.order_by("role", "name")
    ]
    gpus = inventory.gpu_totals()
    # Open tasks only in the WHERE: the finished history is most of the table.
    tasks = Task.objects.filter(status__in=OPEN_STATUSES).aggregate(
        pending=Count("id", filter=Q(status=TaskStatus.PENDING)),
        assigned=Count("id", filter=Q(status=TaskStatus.ASSIGNED)),
        running=Count("id", filter=Q(status=TaskStatus.RUNNING)),
        **{f"p{p.value}": Count("id", filter=Q(status=TaskStatus.PENDING, priority=p.value)) for p in Priority},
    )
    nodes = list(inventory.nodes_with_gpus())
    active_nodes = [n for n in nodes if n.status == NodeStatus.ACTIVE]
    loads = [inventory.node_load(n) for n in active_nodes]
    usable = gpus["free"] + gpus["allocated"]
    return {
        "servers": servers,
        "active_servers": sum(1 for s in servers if s["alive"]),
        "gpu_servers": {"total": len(nodes), **{st: sum(1 for n in nodes if n.status == st)
                                               for st in NodeStatus.values}},
        "gpus": gpus,
        "queue": {"pending": tasks["pending"], "assigned": tasks["assigned"], "running": tasks["running"],
                  "pending_by_priority": {p.label: tasks[f"p{p.value}"] for p in Priority}},
        "load": {
            "allocated_share": round(gpus["allocated"] / usable, 3) if usable else 0.0,
            "mean_utilization_pct": round(sum(lo.mean_utilization_pct * lo.total_gpus for lo in loads)
                                          / max(sum(lo.total_gpus for lo in loads), 1), 1),
            "total_load": round(sum(lo.load_score for lo in loads) / len(loads), 3) if loads else 0.0,
        },
    }


class ClusterView(APIView):
    """Control-plane processes with their heartbeats and roles, GPU totals by state, queue depth and load."""

    @extend_schema(responses={200: dict})
    def get(self, request):
        summary = cluster_summary()
        if request.user.is_staff:
            # Operators also see who holds the scheduler lock (from pg_locks), every
            # process's role, last pass and load, and the q cluster's workers.
            summary["control_plane"] = control_plane.snapshot()
        else:
            # Where the control plane runs (hosts, pids) is for operators, not tenants.
            summary["servers"] = [{k: v for k, v in s.items() if k not in STAFF_ONLY_SERVER_FIELDS}
                                  for s in summary["servers"]]
        return Response(summary)


class HealthView(APIView):
    """Liveness for load balancers: 200 when the database answers (no login needed); says whether a
    scheduler was seen recently (``status`` is "degraded" when not)."""

    permission_classes = [AllowAny]
    authentication_classes: list = []
    throttle_classes: list = []

    @extend_schema(responses={200: inline_serializer("Health", {
        "status": serializers.CharField(), "database": serializers.BooleanField(),
        "scheduler": serializers.DictField(), "time": serializers.DateTimeField()})})
    def get(self, request):
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception as exc:  # report, don't crash: this is what a load balancer polls
            return Response({"status": "down", "database": False, "error": type(exc).__name__,
                             "time": timezone.now()}, status=503)
        # A scheduler shows itself by its registry heartbeat, or by having just run a pass
        # (django-q workers run passes without a loop of their own).
        beats = [
            ControlPlaneServer.objects.filter(role=ControlPlaneServer.Role.SCHEDULER)
            .order_by("-last_seen_at").values_list("last_seen_at", flat=True).first(),
            SchedulerLock.objects.filter(name="scheduler").values_list("acquired_at", flat=True).first(),
        ]
        last = max((b for b in beats if b is not None), default=None)
        seen = last is not None and (timezone.now() - last).total_seconds() <= registry.dead_after_s()
        return Response({
            "status": "ok" if seen else "degraded",
            "database": True,
            "scheduler": {"seen_recently": seen, "last_seen_at": last, "within_s": registry.dead_after_s()},
            "time": timezone.now(),
        })


class ApiRootView(APIView):
    """What lives under /api/v1/."""

    @extend_schema(exclude=True)
    def get(self, request):
        names = ["task-list", "gpu-list", "server-list", "quota", "cluster", "health"]
        return Response({n.removesuffix("-list"): reverse(f"api:{n}", request=request) for n in names})


