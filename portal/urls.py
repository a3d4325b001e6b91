from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from django.utils.translation import gettext_lazy as _
from django.views.i18n import JavaScriptCatalog
from django.views.static import serve
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.admin_views import booking_calendar, cluster_overview, usage_report, what_if
from portal.metrics_access import metrics_view

admin.site.site_header = _("GPU allocation portal")
admin.site.site_title = _("GPU portal admin")
admin.site.index_title = _("Operations")
# The sidebar of every model would take a quarter of a 1,366 px screen from the task list;
# the index and the breadcrumbs remain the way around.
admin.site.enable_nav_sidebar = False

handler500 = "portal.middleware.server_error"  # a database outage is a 503, not a 500
handler404 = "portal.middleware.not_found"  # JSON under /api/

urlpatterns = [
    path("admin/cluster/", admin.site.admin_view(cluster_overview), name="admin-cluster"),
    path("admin/usage/", admin.site.admin_view(usage_report), name="admin-usage"),
    path("admin/calendar/", admin.site.admin_view(booking_calendar), name="admin-calendar"),
    path("admin/what-if/", admin.site.admin_view(what_if), name="admin-what-if"),
    path("admin/what-if/quota/<int:tenant_id>/", admin.site.admin_view(what_if), name="admin-what-if-quota"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("i18n/", include("django.conf.urls.i18n")),  # set_language: the switch on every page
    path("jsi18n/", JavaScriptCatalog.as_view(), name="javascript-catalog"),  # gettext() for live.js
    path("api/agent/v1/", include("portal.api.nodes.urls")),
    path("api/v1/", include("portal.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("metrics", metrics_view, name="prometheus-django-metrics"),  # before django_prometheus' open one
    path("", include("django_prometheus.urls")),
    path("", include("portal.page_urls")),
]

if settings.OIDC_OP_ISSUER:
    urlpatterns.insert(0, path("oidc/", include("mozilla_django_oidc.urls")))  # single sign-on (portal.sso)

if settings.SERVE_STATIC:
    urlpatterns += [re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATIC_ROOT})]
