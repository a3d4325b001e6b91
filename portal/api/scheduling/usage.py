"""``GET /api/v1/usage``: the usage ledger as JSON or CSV (``?format=csv`` or ``Accept: text/csv``)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from django.http import Http404
from django.utils import timezone
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from scheduling import access
from scheduling.usage import DIMENSIONS, UsageRow

# A year and a bit: longer periods are a batch job, not a request.
MAX_PERIOD_DAYS = 400
FIGURES = ("gpu_hours", "gpu_memory_gb_hours", "utilization_pct")


def row_dict(row: UsageRow, group_by: list[str]) -> dict:
    out: dict = {g: getattr(row, g) for g in group_by}
    out["gpu_hours"] = round(row.gpu_hours, 4)
    out["gpu_memory_gb_hours"] = round(row.gpu_memory_gb_hours, 4)
    out["utilization_pct"] = row.utilization_pct
    return out


class UsageQuerySerializer(serializers.Serializer):
    # Dates (midnight UTC) or ISO 8601 times; times without a zone are UTC.
    to = serializers.DateTimeField(required=False, input_formats=["iso-8601", "%Y-%m-%d"])
    group_by = serializers.CharField(required=False, default="tenant")

    def get_fields(self) -> dict:
        fields = super().get_fields()
        # "from" is a Python keyword, so it cannot be declared as a class attribute.
        fields["from"] = serializers.DateTimeField(required=False, input_formats=["iso-8601", "%Y-%m-%d"])
        return fields

    def validate_group_by(self, value: str) -> list[str]:
        keys = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [k for k in keys if k not in DIMENSIONS]
        if unknown:
            raise serializers.ValidationError(_("Unknown dimension %(name)r: use %(names)s.")
                                              % {"name": unknown[0], "names": ", ".join(DIMENSIONS)})
        return list(dict.fromkeys(keys))

    def validate(self, attrs: dict) -> dict:
        now = timezone.now()
        start = attrs.get("from") or datetime(now.year, now.month, 1, tzinfo=UTC)
        end = attrs.get("to") or now
        if end <= start:
            raise serializers.ValidationError({"to": [_("Must be after from.")]})
        if (end - start).days > MAX_PERIOD_DAYS:
            raise serializers.ValidationError({"to": [_("The period may span at most %(n)s days.")
                                                      % {"n": MAX_PERIOD_DAYS}]})
        attrs["from"], attrs["to"] = start, end
        return attrs


class UsageCSVRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out)
        if isinstance(data, dict) and "rows" in data:
            columns = [*data["group_by"], *FIGURES]
            writer.writerow(columns)
            for row in data["rows"]:
                writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
        else:  # an error: field -> messages
            writer.writerow(["field", "error"])
            for field, messages in (data or {}).items():
                for message in messages if isinstance(messages, list) else [messages]:
                    writer.writerow([field, message])
        return out.getvalue().encode()


class UsageView(APIView):
    """GPU-hours, GPU-memory-hours and mean utilisation for a period, grouped.

    Staff see every tenant; tenant admins their tenants' members; plain members their
    tenants' totals and, grouped by user or task, only their own rows.
    """

    renderer_classes = [JSONRenderer, UsageCSVRenderer, BrowsableAPIRenderer]

    def perform_content_negotiation(self, request, force=False):
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:  # DRF answers an unknown ?format= with 404; it is bad input
            if force:  # rendering that 400 itself: in JSON
                renderer = JSONRenderer()
                return renderer, renderer.media_type
            raise ValidationError({"format": [_("Use json or csv.")]}) from None

    @extend_schema(parameters=[
        OpenApiParameter("from", str, description="start (inclusive): YYYY-MM-DD (midnight UTC) or ISO 8601; "
                                                  "default: the first of this month"),
        OpenApiParameter("to", str, description="end (exclusive), same forms; default: now"),
        OpenApiParameter("group_by", str, description=f"comma-separated: {', '.join(DIMENSIONS)} (default tenant)"),
        OpenApiParameter("format", str, description="json (default) or csv"),
    ], responses={200: OpenApiResponse(OpenApiTypes.OBJECT, description=(
        "{from, to, group_by, rows: [{<each group_by key>, gpu_hours, gpu_memory_gb_hours, utilization_pct}]}"))})
    def get(self, request):
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        group_by = params["group_by"]
        rows = access.usage_for(request.user, params["from"], params["to"], group_by)
        return Response({
            "from": params["from"], "to": params["to"], "group_by": group_by,
            "rows": [row_dict(r, group_by) for r in rows],
        })
