from __future__ import annotations

from rest_framework.routers import SimpleRouter

from portal.api.nodes import inventory_views as views

router = SimpleRouter()
# Both /tasks and /tasks/ (a POST must not be redirected to add a slash).
router.trailing_slash = "/?"
router.register("gpus", views.GPUViewSet, basename="gpu")
router.register("servers", views.ServerViewSet, basename="server")
urlpatterns = router.urls
