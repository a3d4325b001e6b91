"""WSGI entry point: HTTP only (websockets need ``portal.asgi``). Like the ASGI
app, it registers this web process in the control-plane registry when the first
request arrives, so importing it registers nothing."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_wsgi_app = get_wsgi_application()

from django.conf import settings  # noqa: E402  (needs Django set up)

from kernel import registry  # noqa: E402


class RegisterOnFirstRequest:
    def __init__(self, app) -> None:
        self.app = app
        self.started = False

    def __call__(self, environ, start_response):
        if not self.started:  # start_background itself starts one thread per process, under a lock
            self.started = True
            if settings.REGISTRY_ENABLED:
                registry.start_background("web")
        return self.app(environ, start_response)


application = RegisterOnFirstRequest(django_wsgi_app)
