"""Custom admin pages: the live cluster overview."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from portal import control_plane, livedata
from portal.models import Alert
from scheduling.models import Task


def cluster_overview(request: HttpRequest) -> HttpResponse:
    """Every server's GPUs as a grid coloured by state and tenant; live through
    /ws/cluster/ (portal/static/portal/live.js redraws it from each frame)."""
    nodes = livedata.node_rows()
    gpus = livedata.gpu_rows()
    by_node: dict[int, list] = {}
    for g in gpus:
        g["hue"] = (g["tenant_id"] * 137) % 360 if g["state"] == "busy" and g["tenant_id"] else None
        by_node.setdefault(g["node_id"], []).append(g)
    for n in nodes:
        n["gpu_list"] = by_node.get(n["id"], [])
    states = [g["state"] for g in gpus]
    summary = {
        "nodes": len(nodes), "nodes_active": sum(n["status"] == "active" for n in nodes), "gpus": len(gpus),
        "busy": states.count("busy"), "idle": states.count("idle"),
        "unavailable": len(states) - states.count("busy") - states.count("idle"),
        "pending": Task.objects.filter(status="pending").count(),
        "alerts": Alert.objects.filter(acknowledged_at__isnull=True).count(),
    }
    context = {**admin.site.each_context(request), "title": "Cluster overview", "nodes": nodes, "summary": summary,
               "control": control_plane.snapshot()}
    return TemplateResponse(request, "admin/cluster.html", context)
