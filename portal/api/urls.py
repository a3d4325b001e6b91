"""/api/v1/: each app's API routes, plus the cluster-wide views."""

from __future__ import annotations

from django.urls import include, path

from portal.api import views

app_name = "api"

urlpatterns = [
    path("", views.ApiRootView.as_view(), name="root"),
    path("", include("portal.api.scheduling.urls")),
    path("", include("portal.api.nodes.inventory_urls")),
    path("", include("portal.api.tenants.urls")),
    path("cluster", views.ClusterView.as_view(), name="cluster"),
    path("health", views.HealthView.as_view(), name="health"),
]
