"""The users' web portal: dashboard, submit form (with a fit preview), task list
and detail, API tokens. Server-rendered; every page needs a login. Scoping comes
from ``scheduling.access``, validation from ``scheduling.submission`` (the same
path as the API), so the two can never disagree."""

from __future__ import annotations

import re
from datetime import UTC, timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Max, Min, Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from nodes import inventory
from nodes.models import Node
from portal.api.authentication import create_token
from portal.pagination import COUNT_CAP, BoundedCountPaginator
from scheduling import access, lifecycle, logs, reservations, submission, task_fields, usage
from scheduling.calendar import events
from scheduling.choices import FINAL_STATUSES, OPEN_STATUSES, STATUS_GROUPS, ShareMode, TaskStatus
from scheduling.filters import TaskFilter
from scheduling.grants import GrantRequestForm, grants_for
from scheduling.models import TaskLogChunk
from scheduling.preview import would_fit
from scheduling.quotas import quota_report
from tenants.choices import Priority, WorkloadClass
from tenants.models import ApiToken


def _bars(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quota report rows with (label, used, limit, percent) bars for the template."""
    out = []
    for row in report:
        lim, use = row["limits"] or {}, row["usage"]
        bars = []
        for label, used_key, limit_key in ((_("GPUs"), "gpus", "max_gpus"),
                                           (_("GPU memory (MB)"), "gpu_memory_mb", "max_gpu_memory_mb"),
                                           (_("Running tasks"), "running_tasks", "max_running_tasks"),
                                           (_("Pending tasks"), "pending_tasks", "max_pending_tasks")):
            limit = lim.get(limit_key)
            pct = min(100, round(100 * use[used_key] / limit)) if limit else (100 if use[used_key] else 0)
            bars.append({"label": label, "key": used_key, "used": use[used_key], "limit": limit, "pct": pct})
        out.append({**row, "bars": bars})
    return out


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    mine = (access.tasks_for(request.user).filter(submitter=request.user, status__in=OPEN_STATUSES)
            .select_related("tenant", "node").order_by("status", "queue_position", "-created_at")[:50])
    return render(request, "portal/dashboard.html", {
        "quotas": _bars(quota_report(request.user)),
        "tasks": mine,
        "gpus": inventory.gpu_totals(),
    })


def _form_data(post) -> dict[str, Any]:
    """The submit form's fields (task_fields.FORM_FIELDS) as ``validate`` takes them: blank ones
    left out, multi-line ones (command, env, labels) as typed, the others stripped."""
    return {k: post.get(k, "") if k in task_fields.RAW_FORM_FIELDS else post.get(k, "").strip()
            for k in task_fields.FORM_FIELDS if post.get(k, "").strip() != ""}


@login_required
def submit(request: HttpRequest) -> HttpResponse:
    ctx = submission.SubmitContext.load(request.user)
    values: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    preview = None
    if request.method == "POST":
        values = _form_data(request.POST)
        spec, errors = submission.validate(values, ctx)
        if not errors and request.POST.get("action") == "preview":

            preview = would_fit(spec)
        elif not errors:
            try:
                task = submission.create_tasks(ctx, [spec])[0]
            except submission.SubmitError as exc:
                errors = exc.errors
            else:
                messages.success(request, _("Task %(id)s submitted.") % {"id": task.pk})
                return redirect("portal:task", pk=task.pk)
    tenants = sorted(access.tenants_for(request.user).values_list("slug", flat=True))
    if not values.get("tenant") and len(tenants) == 1:
        values["tenant"] = tenants[0]
    return render(request, "portal/submit.html", {
        "values": values, "errors": errors, "preview": preview, "tenants": tenants,
        "priorities": Priority.labels, "classes": WorkloadClass.values, "share_modes": ShareMode.values,
        "limits": ctx.limits, "max_timeout": settings.SCHEDULER.max_task_timeout_s,
        "default_timeout": settings.SCHEDULER.default_task_timeout_s, "fields": task_fields.BY_NAME,
    }, status=400 if errors else 200)


# Tasks the list counts before it says "more than" (portal.pagination).
TASK_LIST_COUNT_CAP = COUNT_CAP


@login_required
def task_list(request: HttpRequest) -> HttpResponse:
    """The tasks I may see, filtered like ``GET /api/v1/tasks`` (``scheduling.filters.TaskFilter``),
    each array folded onto one line (``?array=ID`` lists one array's elements); a bad filter
    value is shown above an empty list, with a 400."""
    filters = TaskFilter(request.GET, queryset=access.tasks_for(request.user)
                         .select_related("tenant", "submitter", "node", "array"), request=request)
    valid = filters.is_valid()
    qs = filters.qs if valid else filters.queryset.none()
    array = request.GET.get("array", "") if valid else ""
    page = BoundedCountPaginator(qs if array else _folded(qs), 50, cap=TASK_LIST_COUNT_CAP).get_page(
        request.GET.get("page"))
    if not array:
        _summarise_arrays(qs, page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "portal/task_list.html", {
        "page": page, "status": request.GET.get("status", ""), "tenant": request.GET.get("tenant", ""),
        "mine": valid and filters.form.cleaned_data.get("mine"), "errors": filters.errors, "query": query.urlencode(),
        "array": array, "statuses": [*STATUS_GROUPS, *TaskStatus.values],
        "tenants": list(access.tenants_for(request.user).values_list("slug", flat=True)),
    }, status=200 if valid else 400)


def _folded(qs):
    """``qs`` with each array reduced to one task (its first element in ``qs``), like ``gpuctl queue``."""
    firsts = qs.filter(array__isnull=False).order_by().values("array_id").annotate(first=Min("id")).values("first")
    return qs.filter(Q(array__isnull=True) | Q(pk__in=firsts))


def _summarise_arrays(qs, tasks) -> None:
    """Give each listed array's task an ``array_summary``: its elements in ``qs`` counted by state
    (in the states' order), the earliest queue position and a pending element's reason."""
    tasks = list(tasks)
    ids = {t.array_id for t in tasks if t.array_id is not None}
    if not ids:
        return
    counts: dict[int, dict[str, int]] = {i: {} for i in ids}
    position: dict[int, int | None] = dict.fromkeys(ids)
    reason: dict[int, str] = dict.fromkeys(ids, "")
    rows = (qs.filter(array_id__in=ids).order_by().values("array_id", "status")
            .annotate(n=Count("id"), pos=Min("queue_position"), why=Max("pending_reason")))
    for row in rows:
        counts[row["array_id"]][row["status"]] = row["n"]
        if row["pos"] is not None and (position[row["array_id"]] is None or row["pos"] < position[row["array_id"]]):
            position[row["array_id"]] = row["pos"]
        if row["status"] == TaskStatus.PENDING and row["why"]:
            reason[row["array_id"]] = row["why"]
    for t in tasks:
        if t.array_id is not None:
            by_state = counts[t.array_id]
            t.array_summary = {
                "counts": [(value, label, by_state[value]) for value, label in TaskStatus.choices if value in by_state],
                "total": sum(by_state.values()), "queue_position": position[t.array_id],
                "pending_reason": reason[t.array_id],
            }


@login_required
def task_detail(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(access.tasks_for(request.user).select_related("tenant", "submitter", "node"), pk=pk)
    rank = _rank_param(request, task)
    if rank is None:
        return HttpResponse(_("rank must be a whole number from 0 to %(last)s\n") % {"last": max(task.nodes - 1, 0)},
                            status=400, content_type="text/plain; charset=utf-8")
    gpus = [f"{a.node.name}:{a.gpu.index}" for a in
            task.allocations.filter(released_at__isnull=True).select_related("node", "gpu").order_by("gpu_id")]
    # A gang keeps one log per rank (server): the page shows one, with a selector for the others.
    servers = {r.rank: r.node.name for r in task.current_ranks()}
    ranks = [(r, servers.get(r, "")) for r in range(task.nodes)] if task.nodes > 1 else []
    return render(request, "portal/task_detail.html", {
        "task": task, "gpus": gpus, "events": task.events.order_by("created_at", "id"),
        "log": logs.tail(task, logs.VIEW_TAIL_LINES, rank=rank), "earlier_attempts": range(task.attempt),
        "can_cancel": not task.is_final and access.can_cancel(request.user, task),
        "rank": rank, "ranks": ranks,
    })


def _rank_param(request: HttpRequest, task) -> int | None:
    """``?rank=`` (a gang's rank; 0 when absent), or None when it names no rank of the task."""
    raw = request.GET.get("rank", "0")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 5) or int(raw) >= max(task.nodes, 1):
        return None
    return int(raw)


@login_required
def task_log(request: HttpRequest, pk: int) -> HttpResponse:
    """The whole output of one attempt (default: the current one) as plain text, streamed."""
    task = get_object_or_404(access.tasks_for(request.user), pk=pk)
    try:
        attempt = int(request.GET.get("attempt", task.attempt))
    except ValueError:
        return HttpResponse("attempt must be a whole number\n", status=400, content_type="text/plain")
    if not 0 <= attempt <= task.attempt:
        return HttpResponse(f"task {task.pk} has attempts 0 to {task.attempt}\n", status=400,
                            content_type="text/plain")
    rank = _rank_param(request, task)
    if rank is None:
        return HttpResponse(f"task {task.pk} has ranks 0 to {max(task.nodes - 1, 0)}\n", status=400,
                            content_type="text/plain")
    chunks = (TaskLogChunk.objects.filter(task=task, attempt=attempt, rank=rank).order_by("offset")
              .values_list("data", flat=True).iterator(chunk_size=200))
    response = StreamingHttpResponse(chunks, content_type="text/plain; charset=utf-8")
    suffix = f"-rank-{rank}" if task.nodes > 1 else ""
    response["Content-Disposition"] = f'inline; filename="task-{task.pk}-attempt-{attempt}{suffix}.log"'
    return response


@login_required
@require_POST
def task_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(access.tasks_for(request.user), pk=pk)
    if not access.can_cancel(request.user, task):
        messages.error(request, _("Only the submitter, a tenant admin or an operator may cancel this task."))
    elif task.status in FINAL_STATUSES:
        messages.info(request, _("Task %(id)s already ended (%(status)s).")
                      % {"id": task.pk, "status": task.get_status_display()})
    else:
        lifecycle.cancel(task.pk, actor=f"user:{request.user.get_username()}")
        messages.success(request, _("Task %(id)s cancelled.") % {"id": task.pk})
    return redirect("portal:task", pk=task.pk)


TOKEN_NAME_MAX = ApiToken._meta.get_field("name").max_length
TOKEN_MAX_DAYS = 3650


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    new_secret = None
    errors: dict[str, str] = {}
    if request.method == "POST":
        name = request.POST.get("name", "").strip()
        days_raw = request.POST.get("expires_days", "").strip()
        days = None
        if not name:
            errors["name"] = _("Give the token a name (what it is for).")
        elif len(name) > TOKEN_NAME_MAX:
            errors["name"] = _("At most %(n)s characters.") % {"n": TOKEN_NAME_MAX}
        if days_raw:
            if not re.fullmatch(r"[0-9]{1,5}", days_raw) or not 1 <= int(days_raw) <= TOKEN_MAX_DAYS:
                errors["expires_days"] = _("A whole number of days from 1 to %(n)s, or empty for never.") % {
                    "n": TOKEN_MAX_DAYS}
            else:
                days = int(days_raw)
        if not errors:
            expires = timezone.now() + timedelta(days=days) if days else None
            new_secret = create_token(request.user, name, expires)[1]
    return render(request, "portal/tokens.html", {
        "tokens": ApiToken.objects.filter(user=request.user).order_by("-created_at"),
        "new_secret": new_secret, "errors": errors, "now": timezone.now(),
        "api_url": request.build_absolute_uri("/").rstrip("/"),
    }, status=400 if errors else 200)


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    updated = ApiToken.objects.filter(pk=pk, user=request.user).update(enabled=False)
    if not updated:
        raise Http404
    messages.success(request, _("Token revoked."))
    return redirect("portal:tokens")


def usage_table(rows, key: str) -> list[dict[str, Any]]:
    """Report rows as the usage tables show them (shared by the admin's usage report)."""
    return [{"name": getattr(r, key), "gpu_hours": r.gpu_hours, "gpu_memory_gb_hours": r.gpu_memory_gb_hours,
             "utilization_pct": r.utilization_pct} for r in rows]


@login_required
def usage_page(request: HttpRequest) -> HttpResponse:
    """A month of the viewer's tenants' GPU-hours: by tenant, by user, by GPU model, and per day.

    Scoped by ``scheduling.access.usage_for``: tenant admins see every member, plain
    members their tenant's totals and their own per-user line.
    """

    now = timezone.now()
    try:
        month = usage.month_of(request.GET.get("month"), now.date())
    except usage.ReportError as exc:
        messages.error(request, str(exc))
        return redirect("portal:usage")
    start, end = usage.month_bounds(month)
    if start >= now:
        rows_by = {"tenant": [], "user": [], "gpu_model": []}
    else:
        rows_by = {key: usage_table(access.usage_for(request.user, start, end, [key]), key)
                   for key in ("tenant", "user", "gpu_model")}
    days = []
    day = start
    while day < min(end, now):
        days.append((day, day + timedelta(days=1)))
        day += timedelta(days=1)
    chart = usage.series(days, "tenant", lambda s, e: access.usage_for(request.user, s, e, ["tenant"]))
    chart["labels"] = [d.strftime("%d") for d, _ in days]
    chart["title"] = "GPU-hours per day"
    return render(request, "portal/usage.html", {
        "month": month, "prev": usage.add_months(month, -1), "next": usage.add_months(month, 1),
        "rows": rows_by, "chart": chart, "is_tenant_admin": bool(access.admin_tenant_ids(request.user)),
    })


@login_required
def quota_grants(request: HttpRequest) -> HttpResponse:
    """My tenants' quota grants, and the request form for tenant admins."""

    form = GrantRequestForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        grant = form.save()
        messages.success(request, _("Quota grant #%(id)s requested: an operator will approve or reject it.")
                         % {"id": grant.pk})
        return redirect("portal:grants")
    now = timezone.now()
    grants = grants_for(request.user).select_related("tenant", "requested_by", "decided_by")[:200]
    rows = [(g, g.status_at(now)) for g in grants]
    return render(request, "portal/grants.html", {
        "form": form, "rows": rows, "can_request": access.administered_tenants(request.user).exists(),
    }, status=400 if form.errors else 200)


@login_required
def reservation_list(request: HttpRequest) -> HttpResponse:
    """My tenants' reservations, and the request form (also filled by a drag on the calendar)."""

    form = reservations.ReservationRequestForm(request.POST or None, user=request.user)
    refused = None
    if request.method == "POST" and form.is_valid():
        try:
            res = reservations.request(form)
        except reservations.ReservationError as exc:
            refused = exc.message
            form.add_error(None, exc.message)
        else:
            if res.state == res.State.APPROVED:
                messages.success(request, _("Reservation %(name)s approved by your tenant's policy.")
                                 % {"name": res.name})
            else:
                messages.success(request, _("Reservation %(name)s requested: an operator will approve or reject it.")
                                 % {"name": res.name})
            return redirect("portal:reservations")
    now = timezone.now()
    rows = [(r, reservations.as_row(r, now)["status"], reservations.can_manage(request.user, r))
            for r in reservations.reservations_for(request.user).select_related("tenant", "requested_by",
                                                                               "decided_by")[:200]]
    return render(request, "portal/reservations.html", {
        "form": form, "rows": rows, "refused": refused,
        "can_request": access.administered_tenants(request.user).exists(),
    }, status=400 if form.errors else 200)


@login_required
@require_POST
def reservation_release(request: HttpRequest, pk: int) -> HttpResponse:
    from django.core.exceptions import PermissionDenied


    res = get_object_or_404(reservations.reservations_for(request.user), pk=pk)
    try:
        freed = reservations.release_unused(res.pk, by=request.user)
    except PermissionDenied as exc:
        messages.error(request, str(exc))
    except reservations.ReservationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, _("Reservation %(name)s: released %(n)s unused GPU booking(s).")
                         % {"name": res.name, "n": freed})
    return redirect("portal:reservations")


@login_required
def calendar(request: HttpRequest) -> HttpResponse:
    """Week and month views of every server's bookings (FullCalendar, vendored in static)."""

    return render(request, "portal/calendar.html", {
        "servers": list(Node.objects.order_by("name").values_list("name", flat=True)),
        "can_request": access.administered_tenants(request.user).exists(),
        "form": reservations.ReservationRequestForm(user=request.user),
    })


@login_required
def calendar_events(request: HttpRequest) -> JsonResponse:
    """Bookings overlapping [start, end) for the calendar, and free GPUs per day.

    Every tenant's approved reservations are shown (name and tenant: the cluster is
    shared, and people plan around each other); requests only to their own tenants."""

    try:
        start, end = parse_datetime(request.GET.get("start", "")), parse_datetime(request.GET.get("end", ""))
    except ValueError:  # well-formed but impossible, e.g. month 13
        start = end = None
    # Times without an offset are UTC, as the calendar shows them.
    start, end = [t if t is None or t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end)]
    if start is None or end is None or end <= start or (end - start).days > 62:
        return JsonResponse({"error": "start and end: ISO times, at most 62 days apart"}, status=400)
    return JsonResponse(events(request.user, start, end, server=request.GET.get("server") or None), safe=False)
