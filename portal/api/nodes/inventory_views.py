"""GPU inventory for users: every authenticated user sees every server and GPU
(capacity is shared), but never which other tenant's task holds a GPU."""

from __future__ import annotations

from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import viewsets

from nodes import inventory
from nodes.filters import GPUFilter, ServerFilter
from portal.api.nodes.inventory_serializers import GPUSerializer, ServerSerializer
from scheduling.access import model_names_for


class HidesOtherTenantsModels:
    """GPUs list only the cached models the caller's tenants use (staff: all)."""

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "visible_models": model_names_for(self.request.user)}


class GPUViewSet(HidesOtherTenantsModels, viewsets.ReadOnlyModelViewSet):
    serializer_class = GPUSerializer
    pagination_class = None
    filter_backends = [DjangoFilterBackend]
    filterset_class = GPUFilter

    def get_queryset(self):
        return inventory.gpus_with_usage().order_by("node__name", "index")

    def filter_queryset(self, queryset):
        return super().filter_queryset(queryset) if self.action == "list" else queryset


class ServerViewSet(HidesOtherTenantsModels, viewsets.ReadOnlyModelViewSet):
    serializer_class = ServerSerializer
    pagination_class = None
    filter_backends = [DjangoFilterBackend]
    filterset_class = ServerFilter

    def get_queryset(self):
        return inventory.nodes_with_gpus().order_by("name")

    def filter_queryset(self, queryset):
        return super().filter_queryset(queryset) if self.action == "list" else queryset
