"""/api/v1/reservations: request, list, approve/reject (staff), release unused GPUs, and
what-if. Thin: the rules are in ``scheduling.reservations`` (the portal pages use the same)."""

from __future__ import annotations

import json

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.utils.datastructures import MultiValueDict
from django.utils.translation import gettext as _
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response

from scheduling import reservations, whatif
from scheduling.models import Reservation


def form_errors(form) -> dict[str, list[str]]:
    return {("non_field_errors" if k == "__all__" else k): [e["message"] for e in v]
            for k, v in form.errors.get_json_data().items()}


class ReservationSerializer(serializers.Serializer):
    """A reservation as the API shows it (``status``: requested, rejected, released,
    upcoming, active or over)."""

    id = serializers.IntegerField(read_only=True)
    name = serializers.SlugField(max_length=60)
    tenant = serializers.CharField()
    gpu_count = serializers.IntegerField(min_value=1)
    gpu_model = serializers.CharField(required=False, allow_blank=True)
    node_selector = serializers.DictField(child=serializers.CharField(), required=False)
    nodes = serializers.ListField(child=serializers.CharField(), required=False, write_only=True,
                                  help_text="Only these servers (by name).")
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    repeat_weeks = serializers.IntegerField(required=False, min_value=0, max_value=reservations.MAX_REPEAT_WEEKS)
    reason = serializers.CharField(required=False, allow_blank=True)
    state = serializers.CharField(read_only=True)
    status = serializers.CharField(read_only=True)
    requested_by = serializers.CharField(read_only=True, allow_null=True)
    decided_by = serializers.CharField(read_only=True, allow_null=True)
    decision_note = serializers.CharField(read_only=True)


class DecisionSerializer(serializers.Serializer):
    note = serializers.CharField(required=False, allow_blank=True, max_length=500)


class WhatIfSerializer(serializers.Serializer):
    """What the next pass would do with the proposed change (nothing is written)."""

    now = serializers.DateTimeField()
    would_start = serializers.ListField(child=serializers.DictField(), help_text="task, name, tenant, placement, "
                                        "also_without_change")
    keep_waiting = serializers.ListField(child=serializers.DictField(), help_text="task, name, tenant, position, "
                                         "reason (first 100)")
    waiting_count = serializers.IntegerField()
    would_no_longer_start = serializers.ListField(child=serializers.IntegerField())
    over_quota = serializers.ListField(child=serializers.DictField(), help_text="tenant, over, running_tasks "
                                       "(never killed)")
    overlapping_running = serializers.ListField(child=serializers.DictField(),
                                                help_text="for a reservation: running tasks of other tenants "
                                                          "on its GPUs that may run past its start")
    note = serializers.CharField()


class ReleaseResultSerializer(serializers.Serializer):
    released = serializers.IntegerField(help_text="GPU bookings given back.")
    reservation = ReservationSerializer()


def _form_data(data) -> MultiValueDict:
    """JSON body -> the request form's input (the portal page posts the same fields)."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": [_("Expected a JSON object describing one reservation.")]})
    out = MultiValueDict()
    for key, value in data.items():
        if key == "nodes":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise ValidationError({"nodes": [_("A list of server names.")]})
            out.setlist("nodes", value)
        elif key == "node_selector":
            out[key] = json.dumps(value)
        elif value is not None:
            out[key] = str(value)
    out.setdefault("repeat_weeks", "0")
    return out


class ReservationViewSet(viewsets.ViewSet):
    lookup_value_regex = r"\d+"

    def _get(self, request, pk) -> Reservation:
        res = reservations.reservations_for(request.user).select_related("tenant").filter(pk=pk).first()
        if res is None:
            raise NotFound(_("No such reservation."))
        return res

    @extend_schema(responses={200: ReservationSerializer(many=True)})
    def list(self, request):
        qs = reservations.reservations_for(request.user).select_related("tenant", "requested_by", "decided_by")
        state = request.query_params.get("state")
        if state:
            qs = qs.filter(state=state)
        return Response([reservations.as_row(r) for r in qs.order_by("starts_at", "id")[:1000]])

    @extend_schema(responses={200: ReservationSerializer})
    def retrieve(self, request, pk=None):
        return Response(reservations.as_row(self._get(request, pk)))

    @extend_schema(request=ReservationSerializer, responses={201: ReservationSerializer})
    def create(self, request):
        """Request a reservation (tenant admin). Approved at once within the tenant's policy;
        a conflict with another reservation is refused with the reason."""
        form = reservations.ReservationRequestForm(_form_data(request.data), user=request.user)
        if not form.is_valid():
            raise ValidationError(form_errors(form))
        try:
            res = reservations.request(form)
        except reservations.ReservationError as exc:
            raise ValidationError({exc.field: [exc.message]}) from None
        return Response(reservations.as_row(res), status=status.HTTP_201_CREATED)

    def _decide(self, request, pk, approve: bool):
        if not request.user.is_staff:
            raise PermissionDenied(_("Only staff approve or reject reservations."))
        res = self._get(request, pk)
        note = request.data.get("note", "") if isinstance(request.data, dict) else ""
        try:
            res = reservations.decide(res.pk, approve=approve, by=request.user, note=str(note))
        except reservations.ReservationError as exc:
            raise ValidationError({exc.field: [exc.message]}) from None
        return Response(reservations.as_row(res))

    @extend_schema(request=DecisionSerializer, responses={200: ReservationSerializer})
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Book its GPUs (staff). A conflict is refused with the reason."""
        return self._decide(request, pk, True)

    @extend_schema(request=DecisionSerializer, responses={200: ReservationSerializer})
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        return self._decide(request, pk, False)

    @extend_schema(request=None, responses={200: ReleaseResultSerializer})
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):
        """Give back the GPUs the tenant's tasks do not hold now (tenant admin or staff)."""
        res = self._get(request, pk)
        try:
            freed = reservations.release_unused(res.pk, by=request.user)
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from None
        except reservations.ReservationError as exc:
            raise ValidationError({exc.field: [exc.message]}) from None
        res.refresh_from_db()
        return Response({"released": freed, "reservation": reservations.as_row(res)})

    @extend_schema(request=None, responses={200: WhatIfSerializer})
    @action(detail=True, methods=["post"])
    def simulate(self, request, pk=None):
        """What-if (staff): what the next pass would do if this request were approved now;
        which running tasks of other tenants overlap its window. Writes nothing."""
        if not request.user.is_staff:
            raise PermissionDenied(_("Only staff simulate approvals."))
        res = self._get(request, pk)
        if res.state != Reservation.State.REQUESTED:
            raise ValidationError({"state": [f"reservation {res.name} is {res.state}: only requests are simulated"]})
        try:
            return Response(whatif.simulate(whatif.reservation_approval(res.pk)))
        except reservations.ReservationError as exc:
            raise ValidationError({exc.field: [exc.message]}) from None
