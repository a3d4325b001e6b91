from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class KernelConfig(AppConfig):
    """The shared kernel: the control-plane models and the plumbing every app uses.

    Its label is ``portal`` because these models were born in the ``portal`` app: the label
    keeps their tables (``portal_alert``, ...), migration history, admin URLs and permissions
    exactly as deployed databases have them.
    """

    name = "kernel"
    label = "portal"
    verbose_name = _("Portal")

    def ready(self) -> None:
        from django_q.signals import post_spawn

        # Each q cluster worker process joins the control-plane registry (role "worker").
        post_spawn.connect(_q_worker_spawned, dispatch_uid="kernel.registry.q_worker")


def _q_worker_spawned(sender, proc_name: str = "", **kwargs) -> None:
    import multiprocessing
    import os

    if multiprocessing.parent_process() is None:
        return  # a synchronous q cluster (Q_SYNC, tests) runs the worker in this very process

    # Imported here: an apps module loads before the models do.
    from django.db import connection

    from kernel import control_plane, registry
    from kernel.models import ControlPlaneServer

    # Name this worker's database sessions, so a pass it runs shows who holds the lock.
    connection.close()
    connection.settings_dict.setdefault("OPTIONS", {})["application_name"] = control_plane.application_name(
        os.environ.get("PORTAL_PROCESS_NAME") or "gpu-portal-qcluster", ControlPlaneServer.Role.WORKER)
    registry.start_background(ControlPlaneServer.Role.WORKER)
