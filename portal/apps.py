from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class PortalConfig(AppConfig):
    """The project package on top of the apps: settings, URLs, ASGI routing, the web pages,
    the REST APIs (``portal.api``), the admin (``portal.admin``) and ``/metrics``.

    Labelled ``web``: the ``portal`` label belongs to the kernel's models (``kernel.apps``).
    """

    name = "portal"
    label = "web"
    verbose_name = _("Portal")

    def ready(self) -> None:
        from portal import metrics  # it reads models: importable only once the registry is ready

        metrics.register()
