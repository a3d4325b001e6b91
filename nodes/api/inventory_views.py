"""GPU inventory for users: every authenticated user sees every server and GPU
(capacity is shared), but never which other tenant's task holds a GPU."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import viewsets
from rest_framework.exceptions import ValidationError

from nodes import inventory
from nodes.api.inventory_serializers import GPUSerializer, ServerSerializer
from nodes.models import NodeStatus
from scheduling.access import model_names_for


class HidesOtherTenantsModels:
    """GPUs list only the cached models the caller's tenants use (staff: all)."""

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "visible_models": model_names_for(self.request.user)}


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("server", str, description="only this server's GPUs"),
    OpenApiParameter("state", str, enum=list(inventory.GPU_STATES),
                     description=f"one of {', '.join(inventory.GPU_STATES)}"),
]))
class GPUViewSet(HidesOtherTenantsModels, viewsets.ReadOnlyModelViewSet):
    serializer_class = GPUSerializer
    pagination_class = None

    def get_queryset(self):
        qs = inventory.gpus_with_usage().order_by("node__name", "index")
        server = self.request.query_params.get("server")
        if server:
            qs = qs.filter(node__name=server)
        return qs

    def filter_queryset(self, queryset):
        state = self.request.query_params.get("state")
        if not state or self.action != "list":
            return queryset
        if state not in inventory.GPU_STATES:
            raise ValidationError({"state": [f"Must be one of {', '.join(inventory.GPU_STATES)}."]})
        return [g for g in queryset if inventory.state_of(g) == state]


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("status", str, enum=list(NodeStatus.values),
                     description="active, draining, maintenance, offline")]))
class ServerViewSet(HidesOtherTenantsModels, viewsets.ReadOnlyModelViewSet):
    serializer_class = ServerSerializer
    pagination_class = None

    def get_queryset(self):
        qs = inventory.nodes_with_gpus().order_by("name")
        status = self.request.query_params.get("status")
        if status:
            if status not in NodeStatus.values:
                raise ValidationError({"status": [f"Must be one of {', '.join(NodeStatus.values)}."]})
            qs = qs.filter(status=status)
        return qs
