from __future__ import annotations

from rest_framework.routers import SimpleRouter

from scheduling.api import views
from scheduling.api.reservations import ReservationViewSet

router = SimpleRouter()
# Both /tasks and /tasks/ (a POST must not be redirected to add a slash).
router.trailing_slash = "/?"
router.register("tasks", views.TaskViewSet, basename="task")
router.register("reservations", ReservationViewSet, basename="reservation")
urlpatterns = router.urls
