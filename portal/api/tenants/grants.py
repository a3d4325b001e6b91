"""/api/v1/quota-grants: request (tenant admin), list, approve/reject (staff). Thin: the
rules are in ``scheduling.grants`` (the portal page and the admin use the same)."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.scheduling.reservations import WhatIfSerializer
from scheduling import grants, whatif
from scheduling.quotas import grant_row
from tenants.models import Tenant


class QuotaGrantSerializer(serializers.Serializer):
    """``status``: requested, rejected, upcoming, active or expired."""

    id = serializers.IntegerField(read_only=True)
    tenant = serializers.CharField()
    extra_gpus = serializers.IntegerField(required=False, min_value=0)
    extra_gpu_memory_mb = serializers.IntegerField(required=False, min_value=0)
    extra_running_tasks = serializers.IntegerField(required=False, min_value=0)
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    reason = serializers.CharField()
    state = serializers.CharField(read_only=True)
    status = serializers.CharField(read_only=True)
    requested_by = serializers.CharField(read_only=True, allow_null=True)
    decided_by = serializers.CharField(read_only=True, allow_null=True)


def _row(g) -> dict:
    return {**grant_row(g, timezone.now()), "tenant": g.tenant.slug}


class QuotaGrantViewSet(viewsets.ViewSet):
    lookup_value_regex = r"\d+"

    def _get(self, request, pk):
        g = grants.grants_for(request.user).select_related("tenant").filter(pk=pk).first()
        if g is None:
            raise NotFound("No such quota grant.")
        return g

    @extend_schema(responses={200: QuotaGrantSerializer(many=True)})
    def list(self, request):
        qs = grants.grants_for(request.user).select_related("tenant", "requested_by", "decided_by")
        return Response([_row(g) for g in qs[:1000]])

    @extend_schema(responses={200: QuotaGrantSerializer})
    def retrieve(self, request, pk=None):
        return Response(_row(self._get(request, pk)))

    @extend_schema(request=QuotaGrantSerializer, responses={201: QuotaGrantSerializer})
    def create(self, request):
        """Ask for extra quota over a window, with a reason (tenant admin); staff decide."""
        if not isinstance(request.data, dict):
            raise ValidationError({"non_field_errors": ["Expected a JSON object describing one grant."]})
        data = {k: str(v) for k, v in request.data.items() if v is not None}
        for key in ("extra_gpus", "extra_gpu_memory_mb", "extra_running_tasks"):
            data.setdefault(key, "0")
        form = grants.GrantRequestForm(data, user=request.user)
        if not form.is_valid():
            raise ValidationError({("non_field_errors" if k == "__all__" else k): [e["message"] for e in v]
                                   for k, v in form.errors.get_json_data().items()})
        return Response(_row(form.save()), status=status.HTTP_201_CREATED)

    def _decide(self, request, pk, approve: bool):
        g = self._get(request, pk)
        try:
            g = grants.decide(g.pk, approve=approve, by=request.user)
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from None
        except ValueError as exc:
            raise ValidationError({"state": [str(exc)]}) from None
        return Response(_row(g))

    @extend_schema(request=None, responses={200: QuotaGrantSerializer})
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Staff only. Applies from its start (at once if the window is open)."""
        return self._decide(request, pk, True)

    @extend_schema(request=None, responses={200: QuotaGrantSerializer})
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        return self._decide(request, pk, False)

    @extend_schema(request=None, responses={200: WhatIfSerializer})
    @action(detail=True, methods=["post"])
    def simulate(self, request, pk=None):
        """What-if (staff): what the next pass would do were this grant approved. Writes nothing."""

        if not request.user.is_staff:
            raise PermissionDenied("Only staff simulate approvals.")
        g = self._get(request, pk)
        return Response(whatif.simulate(whatif.grant_approval(g.pk)))


class QuotaWhatIfSerializer(serializers.Serializer):
    tenant = serializers.CharField()
    max_gpus = serializers.IntegerField(required=False, min_value=0, max_value=2**31 - 1)
    max_gpu_memory_mb = serializers.IntegerField(required=False, min_value=0, max_value=2**63 - 1)
    max_running_tasks = serializers.IntegerField(required=False, min_value=0, max_value=2**31 - 1)


class QuotaWhatIfView(APIView):
    """What-if (staff): what the next pass would do with this tenant's quota changed. Writes nothing."""

    @extend_schema(request=QuotaWhatIfSerializer, responses={200: WhatIfSerializer})
    def post(self, request):

        if not request.user.is_staff:
            raise PermissionDenied("Only staff simulate quota changes.")
        ser = QuotaWhatIfSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = dict(ser.validated_data)
        tenant = Tenant.objects.filter(slug=data.pop("tenant")).first()
        if tenant is None:
            raise ValidationError({"tenant": ["Unknown tenant."]})
        return Response(whatif.simulate(whatif.quota_change(tenant.pk, **data)))
