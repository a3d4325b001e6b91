from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.tenants.serializers import TenantQuotaSerializer
from scheduling.quotas import quota_report


class QuotaView(APIView):
    """Each of my tenants (every tenant for staff): quota limits beside live usage."""

    @extend_schema(responses={200: TenantQuotaSerializer(many=True)})
    def get(self, request):
        return Response(quota_report(request.user))
