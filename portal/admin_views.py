"""Custom admin pages: the live cluster overview."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _

from kernel import control_plane
from kernel.models import Alert
from nodes.gpu_state import GPUState
from nodes.models import Node, NodeStatus
from portal import livedata
from portal.views import usage_table
from scheduling import reservations, usage, whatif
from scheduling.choices import TaskStatus
from scheduling.models import Reservation, Task
from tenants.models import QuotaGrant, Tenant


def cluster_overview(request: HttpRequest) -> HttpResponse:
    """Every server's GPUs as a grid coloured by state and tenant; live through
    /ws/cluster/ (portal/static/portal/live.js redraws it from each frame)."""
    nodes = livedata.node_rows()
    gpus = livedata.gpu_rows()
    by_node: dict[int, list] = {}
    for g in gpus:
        g["hue"] = g["tenant_hue"] if g["state"] == GPUState.ALLOCATED else None
        g["state_label"] = GPUState(g["state"]).label
        by_node.setdefault(g["node_id"], []).append(g)
    for n in nodes:
        n["gpu_list"] = by_node.get(n["id"], [])
        n["status_label"] = NodeStatus(n["status"]).label
    states = [g["state"] for g in gpus]
    summary = {
        "nodes": len(nodes), "nodes_active": sum(n["status"] == NodeStatus.ACTIVE for n in nodes), "gpus": len(gpus),
        "allocated": states.count(GPUState.ALLOCATED), "free": states.count(GPUState.FREE),
        "other": len(states) - states.count(GPUState.ALLOCATED) - states.count(GPUState.FREE),
        "pending": Task.objects.filter(status=TaskStatus.PENDING).count(),
        "alerts": Alert.objects.filter(acknowledged_at__isnull=True).count(),
    }
    context = {**admin.site.each_context(request), "title": _("Cluster overview"), "nodes": nodes, "summary": summary,
               "control": control_plane.snapshot()}
    return TemplateResponse(request, "admin/cluster.html", context)


def usage_report(request: HttpRequest) -> HttpResponse:
    """The operators' usage report: every tenant per month (a year of months charted),
    drilling down into one tenant's users, GPU models and days."""
    from datetime import timedelta

    from django.utils import timezone


    now = timezone.now()
    try:
        month = usage.month_of(request.GET.get("month"), now.date())
    except usage.ReportError:
        month = now.date().replace(day=1)
    tenant = Tenant.objects.filter(slug=request.GET.get("tenant") or "").first()
    scope = {"tenant_ids": [tenant.pk]} if tenant else {}
    start, end = usage.month_bounds(month)
    context = {**admin.site.each_context(request), "title": "GPU usage", "month": month, "tenant": tenant,
               "prev": usage.add_months(month, -1), "next": usage.add_months(month, 1)}

    def rows(key: str) -> list:
        if start >= now:
            return []
        return usage_table(usage.report(start, end, [key], **scope), key)

    if tenant is None:
        months = [usage.month_bounds(usage.add_months(month, -i)) for i in range(11, -1, -1)]
        months = [(s, e) for s, e in months if s < now]
        chart = usage.series(months, "tenant", lambda s, e: usage.report(s, e, ["tenant"]))
        chart["labels"] = [s.strftime("%Y-%m") for s, _ in months]
        chart["title"] = "GPU-hours per month, by tenant"
        context.update(chart=chart, tenants=rows("tenant"), models=rows("gpu_model"))
    else:
        days = []
        day = start
        while day < min(end, now):
            days.append((day, day + timedelta(days=1)))
            day += timedelta(days=1)
        chart = usage.series(days, "user", lambda s, e: usage.report(s, e, ["user"], **scope))
        chart["labels"] = [d.strftime("%d") for d, _ in days]
        chart["title"] = f"GPU-hours per day of {tenant.slug}, by user"
        context.update(chart=chart, users=rows("user"), models=rows("gpu_model"), classes=rows("workload_class"))
    return TemplateResponse(request, "admin/usage.html", context)


def what_if(request: HttpRequest, tenant_id: int | None = None) -> HttpResponse:
    """The admin's "simulate" for a quota form (POSTed from the tenant's change form),
    a grant request (?grant=ID) or a reservation request (?reservation=ID): what the next
    pass would do after saving it. Writes nothing."""
    from django.shortcuts import get_object_or_404


    error = None
    answer = None
    subject = ""
    try:
        if tenant_id is not None:
            tenant = get_object_or_404(Tenant, pk=tenant_id)
            limits, problems = {}, []
            for key in ("max_gpus", "max_gpu_memory_mb", "max_running_tasks"):
                raw = request.POST.get(f"quota-0-{key}", request.POST.get(key, ""))
                if raw.strip():
                    if not raw.strip().isdigit() or int(raw) > 2**31 - 1:
                        problems.append(f"{key}: a whole number")
                    else:
                        limits[key] = int(raw)
            if problems:
                error = "; ".join(problems)
            else:
                subject = f"quota of {tenant.slug}: " + ", ".join(f"{k} = {v}" for k, v in limits.items())
                answer = whatif.simulate(whatif.quota_change(tenant.pk, **limits))
        elif request.GET.get("grant", "").isdigit():
            grant = get_object_or_404(QuotaGrant, pk=int(request.GET["grant"]))
            subject = f"approving {grant}"
            answer = whatif.simulate(whatif.grant_approval(grant.pk))
        elif request.GET.get("reservation", "").isdigit():
            res = get_object_or_404(Reservation, pk=int(request.GET["reservation"]))
            subject = _("approving reservation %(name)s (%(n)s GPUs for %(tenant)s)") % {
                "name": res.name, "n": res.gpu_count, "tenant": res.tenant.slug}
            if res.state != Reservation.State.REQUESTED:
                error = _("reservation %(name)s is %(state)s: only requests are simulated") % {
                    "name": res.name, "state": res.get_state_display()}
            else:
                answer = whatif.simulate(whatif.reservation_approval(res.pk))
        else:
            error = _("Nothing to simulate: use Simulate on a tenant's quota form, or on grant or reservation "
                      "requests.")
    except reservations.ReservationError as exc:
        error = exc.message
    context = {**admin.site.each_context(request), "title": _("What-if"), "subject": subject, "answer": answer,
               "error": error}
    return TemplateResponse(request, "admin/what_if.html", context, status=400 if error else 200)


def booking_calendar(request: HttpRequest) -> HttpResponse:
    """The booking calendar inside the admin (the portal's Calendar page has the request form)."""

    context = {**admin.site.each_context(request), "title": _("Booking calendar"),
               "servers": list(Node.objects.order_by("name").values_list("name", flat=True))}
    return TemplateResponse(request, "admin/calendar.html", context)
