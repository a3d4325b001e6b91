"""Request guards that keep bad input and a database outage from becoming a 500.

- ``RefuseUnstorableParameters``: a query-string or form value holding a NUL
  character (PostgreSQL text cannot store it, so any lookup with it fails) gets
  a 400 naming the parameter, before any view or admin filter sees it.
- ``DatabaseUnavailable``: while PostgreSQL is unreachable, requests that need
  it get a 503 (JSON under ``/api/``, with ``Retry-After``) instead of an HTML
  500; ``handler500`` does the same for failures outside views.
- ``PageMessages``: Django's messages, for pages only (see the class).
"""

from __future__ import annotations

import sys

from django.contrib.messages.middleware import MessageMiddleware
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError

RETRY_AFTER_S = 5
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def _wants_json(request: HttpRequest) -> bool:
    return _is_api(request) or "application/json" in request.headers.get("Accept", "")


def bad_request(request: HttpRequest, field: str, message: str) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({field: [message]}, status=400)
    return HttpResponse(f"{field}: {message}\n", status=400, content_type="text/plain; charset=utf-8")


def unavailable(request: HttpRequest) -> HttpResponse:
    detail = "The database is unavailable; try again shortly."
    if _wants_json(request):
        response = JsonResponse({"detail": detail}, status=503)
    else:
        response = HttpResponse(detail + "\n", status=503, content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


class RefuseUnstorableParameters:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        sources = [request.GET]
        if request.method == "POST" and request.content_type in FORM_TYPES:
            try:
                sources.append(request.POST)
            except (MultiPartParserError, RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent):
                return bad_request(request, "non_field_errors", "The form body is malformed or too large.")
        for params in sources:
            for key, values in params.lists():
                if "\x00" in key or any("\x00" in v for v in values):
                    return bad_request(request, key.replace("\x00", "\\x00"),
                                       "NUL characters are not allowed.")
        return self.get_response(request)


class PageMessages(MessageMiddleware):
    """Django's messages ("Task 12 submitted.") for the portal's and the admin's pages, not
    for ``/api/``: no API or agent view adds or shows one, and making the request's message
    storage (a cookie storage behind a session one) on each API request cost 1.6% of a
    submit's instructions (callgrind). The response side already skips a request without it."""

    def process_request(self, request: HttpRequest) -> None:
        if not _is_api(request):
            super().process_request(request)


class DatabaseUnavailable:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, (OperationalError, InterfaceError)):
            return unavailable(request)
        return None


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: under ``/api/`` a JSON body, as the schema documents."""
    if _wants_json(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: called while the exception is being handled, so it can tell an
    outage (503) from a bug (500, JSON under ``/api/``)."""
    if isinstance(sys.exc_info()[1], (OperationalError, InterfaceError)):
        return unavailable(request)
    if _wants_json(request):
        return JsonResponse({"detail": "Internal server error."}, status=500)
    from django.views.defaults import server_error as default

    return default(request)
