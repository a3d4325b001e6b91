"""Users' task API. Thin: scoping comes from ``scheduling.access``, validation
and writes from ``scheduling.submission``, cancels from ``scheduling.lifecycle``."""

from __future__ import annotations

import re
from dataclasses import asdict

from django.db.models import Count, Q
from django.utils.translation import gettext as _
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from portal.api.scheduling.serializers import (
    BatchResultSerializer,
    BatchSubmitSerializer,
    PreviewSerializer,
    TaskArraySerializer,
    TaskDetailSerializer,
    TaskEventSerializer,
    TaskLogSerializer,
    TaskSerializer,
    TaskSubmitSerializer,
)
from scheduling import access, lifecycle, logs, submission
from scheduling.choices import FINAL_STATUSES, TaskStatus
from scheduling.filters import TaskFilter
from scheduling.models import TaskArray
from scheduling.preview import would_fit

_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,19}")


def _int_param(request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    if not _WHOLE_NUMBER.fullmatch(raw):  # int() would also take " 1", "1_0" and "١٢"
        raise ValidationError({name: [_("Must be a whole number.")]})
    value = int(raw)
    if not lo <= value <= hi:
        raise ValidationError({name: [_("Must be between %(lo)s and %(hi)s.") % {"lo": lo, "hi": hi}]})
    return value


class TaskViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = TaskSerializer
    lookup_value_regex = r"\d+"
    # The list's query parameters (scheduling.filters, shared with the portal's task page);
    # a bad value is a 400 naming the parameter.
    filter_backends = [DjangoFilterBackend]
    filterset_class = TaskFilter

    def get_serializer_class(self):
        return TaskDetailSerializer if self.action == "retrieve" else TaskSerializer

    def get_queryset(self):
        return access.tasks_for(self.request.user).select_related("tenant", "submitter", "node")

    def filter_queryset(self, queryset):
        # The filters apply to the list only: a task's own URL finds it whatever the query says.
        return super().filter_queryset(queryset) if self.action == "list" else queryset

    @extend_schema(request=TaskSubmitSerializer, responses={201: TaskSerializer})
    def create(self, request):
        ctx = submission.SubmitContext.load(request.user)
        try:
            task = submission.submit(ctx, request.data)
        except submission.SubmitError as exc:
            raise ValidationError(exc.errors) from None
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=BatchSubmitSerializer, responses={201: BatchResultSerializer})
    @action(detail=False, methods=["post"])
    def batch(self, request):
        """Submit up to 1000 tasks in one request: all are created, or none (errors by index)."""
        items = request.data.get("tasks") if isinstance(request.data, dict) else None
        extra = sorted(set(request.data) - {"tasks"}) if isinstance(request.data, dict) else []
        if extra:
            raise ValidationError({extra[0]: [_('Unknown field. A batch is {"tasks": [...]}.')]})
        if not isinstance(items, list) or not items:
            raise ValidationError({"tasks": [_("Required: a non-empty list of tasks.")]})
        if len(items) > submission.BATCH_MAX_TASKS:
            raise ValidationError({"tasks": [_("At most %(limit)s tasks per batch (got %(got)s).")
                                             % {"limit": submission.BATCH_MAX_TASKS, "got": len(items)}]})
        ctx = submission.SubmitContext.load(request.user)
        specs, errors, bad = [], [], False
        for item in items:
            spec, err = submission.validate(item, ctx)
            specs.append(spec)
            errors.append(err)
            bad = bad or bool(err)
        if bad:
            raise ValidationError({"tasks": errors})
        try:
            tasks = submission.create_tasks(ctx, specs)
        except submission.SubmitError as exc:
            raise ValidationError(exc.errors) from None
        return Response({"ids": [t.pk for t in tasks], "count": len(tasks)}, status=status.HTTP_201_CREATED)

    @extend_schema(request=TaskSubmitSerializer, responses={200: PreviewSerializer})
    @action(detail=False, methods=["post"])
    def preview(self, request):
        """Would this task start now, and where, or why not? Validates like a submit; creates nothing."""

        ctx = submission.SubmitContext.load(request.user)
        spec, errors = submission.validate(request.data, ctx)
        if errors:
            raise ValidationError(errors)
        return Response(asdict(would_fit(spec)))

    @extend_schema(request=None, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel a pending, assigned or running task (yours, or any of your tenant's as its admin)."""
        task = self.get_object()
        if not access.can_cancel(request.user, task):
            raise PermissionDenied(_("Only the submitter, a tenant admin or an operator may cancel this task."))
        if task.is_final:
            detail = _("Task %(id)s already ended (%(state)s).") % {"id": task.pk, "state": task.get_status_display()}
            return Response({"detail": detail},
                            status=status.HTTP_409_CONFLICT)
        task = lifecycle.cancel(task.pk, actor=f"user:{request.user.get_username()}")
        task = self.get_queryset().get(pk=task.pk)
        return Response(TaskSerializer(task).data)

    @extend_schema(responses={200: TaskEventSerializer(many=True)}, filters=False)
    @action(detail=True, methods=["get"], pagination_class=None)
    def events(self, request, pk=None):
        task = self.get_object()
        return Response(TaskEventSerializer(task.events.order_by("created_at", "id"), many=True).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("offset", {"type": "integer", "minimum": 0, "maximum": 2**62},
                             description="byte offset to read from (follow with next_offset)"),
            OpenApiParameter("tail", {"type": "integer", "minimum": 1, "maximum": logs.TAIL_MAX_LINES},
                             description=f"the last N lines instead (1..{logs.TAIL_MAX_LINES})"),
            OpenApiParameter("attempt", {"type": "integer", "minimum": 0, "maximum": 10_000},
                             description="which attempt (default: the current one)"),
            OpenApiParameter("rank", {"type": "integer", "minimum": 0, "maximum": 32767},
                             description="a gang's rank (server), 0 by default"),
        ],
        responses={200: TaskLogSerializer},
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def logs(self, request, pk=None):
        task = self.get_object()
        attempt = _int_param(request, "attempt", None, 0, 10_000)
        lines = _int_param(request, "tail", None, 1, logs.TAIL_MAX_LINES)
        rank = _int_param(request, "rank", 0, 0, max(task.nodes - 1, 0))
        if lines is not None:
            if "offset" in request.query_params:
                raise ValidationError({"tail": [_("Give either tail or offset, not both.")]})
            page = logs.tail(task, lines, attempt, rank=rank)
        else:
            page = logs.read_from(task, _int_param(request, "offset", 0, 0, 2**62), attempt, rank=rank)
        return Response(asdict(page))


def _with_counts(qs):
    return qs.annotate(**{f"n_{state}": Count("tasks", filter=Q(tasks__status=state)) for state in TaskStatus.values})


class TaskArrayViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Arrays as one: counts of their elements by state, and cancel all of them at once.
    Each element is also an ordinary task (``/api/v1/tasks?array=ID``)."""

    serializer_class = TaskArraySerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self):
        return _with_counts(TaskArray.objects.filter(tenant__in=access.tenants_for(self.request.user))
                            .select_related("tenant", "submitter")).order_by("-created_at", "-id")

    @extend_schema(request=None, responses={200: TaskArraySerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel every element that has not ended (those you may cancel)."""
        array = self.get_object()
        actor = f"user:{request.user.get_username()}"
        live = access.tasks_for(request.user).filter(array=array).exclude(status__in=FINAL_STATUSES).order_by("pk")
        refused = 0
        for task in live:
            if access.can_cancel(request.user, task):
                lifecycle.cancel(task.pk, actor=actor, reason=f"array #{array.pk} cancelled")
            else:
                refused += 1
        if refused and refused == len(live):
            raise PermissionDenied(_("Only the submitter, a tenant admin or an operator may cancel this array."))
        return Response(TaskArraySerializer(self.get_queryset().get(pk=array.pk)).data)
