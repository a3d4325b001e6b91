from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from portal.api.tenants import views
from portal.api.tenants.grants import QuotaGrantViewSet, QuotaWhatIfView

router = SimpleRouter()
router.trailing_slash = "/?"
router.register("quota-grants", QuotaGrantViewSet, basename="quota-grant")

urlpatterns = [path("quota", views.QuotaView.as_view(), name="quota"),
               path("quota/what-if", QuotaWhatIfView.as_view(), name="quota-what-if"), *router.urls]
