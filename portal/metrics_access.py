"""Who may read ``/metrics``: it names tenants, GPU UUIDs and servers.

Allowed: a request bearing ``Authorization: Bearer <METRICS_TOKEN>`` (set the
token in Prometheus' ``authorization`` block, see ``deploy/prometheus``), or one
whose client address is in ``METRICS_ALLOW_FROM`` (default: loopback only) and
that did not come through a proxy (a proxy on the same host would otherwise make
every caller look local). Anyone else gets 401 and nothing of the cluster.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django_prometheus.exports import ExportToDjangoView

PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    if any(h in request.META for h in PROXY_HEADERS):
        return False
    try:
        client = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(client in network for network in settings.METRICS_ALLOW_FROM)


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        response = JsonResponse({"detail": "/metrics needs 'Authorization: Bearer <METRICS_TOKEN>' or a client "
                                           "address in METRICS_ALLOW_FROM."}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return ExportToDjangoView(request)
