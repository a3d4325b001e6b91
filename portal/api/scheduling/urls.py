from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from portal.api.scheduling import usage, views
from portal.api.scheduling.reservations import ReservationViewSet

router = SimpleRouter()
# Both /tasks and /tasks/ (a POST must not be redirected to add a slash).
router.trailing_slash = "/?"
router.register("tasks", views.TaskViewSet, basename="task")
router.register("arrays", views.TaskArrayViewSet, basename="task-array")
router.register("reservations", ReservationViewSet, basename="reservation")
urlpatterns = [*router.urls, path("usage", usage.UsageView.as_view(), name="usage")]
