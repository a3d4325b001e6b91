"""ASGI entry point (granian, daphne): HTTP through Django, websockets through Channels."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from kernel import registry  # noqa: E402
from portal.routing import websocket_urlpatterns  # noqa: E402
from portal.threaded_http import ThreadedHTTP  # noqa: E402


class RegisterOnFirstRequest:
    """Registers this web process in the control-plane registry (with a heartbeat
    thread) when the first HTTP request arrives: only real servers (daphne) go
    through here, so importing the app in tests or commands registers nothing."""

    def __init__(self, app) -> None:
        self.app = app
        self.started = False

    async def __call__(self, scope, receive, send):
        if not self.started and scope["type"] == "http":
            self.started = True
            if settings.REGISTRY_ENABLED:
                registry.start_background("web")
        return await self.app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        # Django's sync handler on a thread pool (portal/threaded_http.py), not its
        # ASGI adaptation; coroutine views still go through django_asgi_app.
        "http": RegisterOnFirstRequest(ThreadedHTTP(async_app=django_asgi_app)),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
