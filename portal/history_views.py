"""JSON for the history charts (``portal/static/portal/charts.js`` draws them with Chart.js).

Each answer is ``{"range", "step_s", "series": [{"label", "unit", "axis", "points": [[ms, value], ...]}]}``;
``?range=`` is one of ``scheduling.history.RANGES`` (default 24h). Who may read what follows the
pages: GPUs, servers and the cluster's utilisation are visible to every logged-in user
(capacity is shared, as on the dashboard), a tenant's usage to its members and staff, a
task's GPUs to those who see the task.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import Max, Min
from django.http import Http404, HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.translation import gettext as _

from nodes.models import GPU, Node
from scheduling import access, history


def _window(request: HttpRequest) -> tuple[str, history.Window] | JsonResponse:
    name = request.GET.get("range", history.DEFAULT_RANGE)
    if name not in history.RANGES:
        return JsonResponse({"range": [_("One of %(names)s.") % {"names": ", ".join(history.RANGES)}]}, status=400)
    now = timezone.now()
    return name, history.window(now - history.RANGES[name], now, now)


def _answer(name: str, w: history.Window, series: list[dict[str, Any]]) -> JsonResponse:
    return JsonResponse({"range": name, "step_s": w.step_s, "series": series})


def _series(label: str, unit: str, points: list, axis: str = "y", **extra: Any) -> dict[str, Any]:
    return {"label": label, "unit": unit, "axis": axis, "points": points, **extra}


@login_required
def gpu(request: HttpRequest, pk: int) -> JsonResponse:
    g = get_object_or_404(GPU.objects.select_related("node"), pk=pk)
    got = _window(request)
    if isinstance(got, JsonResponse):
        return got
    name, w = got
    s = history.gpu_history([g.pk], w)[g.pk]
    return _answer(name, w, [
        _series(_("utilisation"), "%", s["utilization_pct"]),
        _series(_("temperature"), "°C", s["temperature_c"]),
        _series(_("memory used"), "MB", s["memory_used_mb"], axis="y2"),
    ])


@login_required
def server(request: HttpRequest, pk: int) -> JsonResponse:
    node = get_object_or_404(Node, pk=pk)
    got = _window(request)
    if isinstance(got, JsonResponse):
        return got
    name, w = got
    gpus = list(node.gpus.order_by("index").values_list("pk", "index"))
    per_gpu = history.gpu_history([gpu_id for gpu_id, _index in gpus], w)
    return _answer(name, w, [_series(_("GPU %(index)s utilisation") % {"index": index}, "%",
                                     per_gpu[gpu_id]["utilization_pct"]) for gpu_id, index in gpus])


@login_required
def cluster(request: HttpRequest) -> JsonResponse:
    got = _window(request)
    if isinstance(got, JsonResponse):
        return got
    name, w = got
    c = history.cluster_history(w)
    return _answer(name, w, [
        _series(_("average GPU utilisation"), "%", c["utilization_pct"]),
        _series(_("GPUs in use"), _("GPUs"), c["gpus_in_use"], axis="y2"),
    ])


@login_required
def tenant(request: HttpRequest, slug: str) -> JsonResponse:
    t = get_object_or_404(access.tenants_for(request.user), slug=slug)
    got = _window(request)
    if isinstance(got, JsonResponse):
        return got
    name, w = got
    s = history.tenant_history(t.pk, w)
    return _answer(name, w, [
        _series(_("GPUs in use"), _("GPUs"), s["gpus_in_use"]),
        _series(_("GPU quota"), _("GPUs"), s["gpu_quota"], stepped=True, dashed=True),
    ])


@login_required
def task(request: HttpRequest, pk: int) -> JsonResponse:
    """The task's own GPUs over the time it held them (every attempt), whatever ``range`` says."""
    t = get_object_or_404(access.tasks_for(request.user), pk=pk)
    held = t.allocations.aggregate(since=Min("allocated_at"), until=Max("released_at"))
    if held["since"] is None:
        raise Http404(_("this task never held a GPU"))
    now = timezone.now()
    until = now if t.allocations.filter(released_at__isnull=True).exists() else (held["until"] or now)
    w = history.window(held["since"], until, now)
    gpus = {a.gpu_id: f"{a.node.name}:{a.gpu.index}" for a in
            t.allocations.select_related("node", "gpu").order_by("gpu__node__name", "gpu__index")}
    per_gpu = history.gpu_history(list(gpus), w)
    series = []
    for gpu_id, label in gpus.items():
        series.append(_series(_("%(gpu)s utilisation") % {"gpu": label}, "%", per_gpu[gpu_id]["utilization_pct"]))
        series.append(_series(_("%(gpu)s memory used") % {"gpu": label}, "MB", per_gpu[gpu_id]["memory_used_mb"],
                              axis="y2"))
    return _answer("task", w, series)
