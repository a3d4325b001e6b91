from __future__ import annotations

from django.urls import path

from tenants.api import views

urlpatterns = [path("quota", views.QuotaView.as_view(), name="quota")]
