"""``manage.py qcluster``: django-q2's cluster, with a stop that is never lost.

django-q2 installs its SIGTERM/SIGINT handler when the ``Cluster`` is made, but its handler
only stops a Sentinel that is already alive. A signal that lands before that (while Django
loads the cluster, or while the Sentinel is being forked) is dropped: the cluster then starts
and runs until killed. For ``make run`` that signal is the kernel's "your parent died"
(``PR_SET_PDEATHSIG``), sent once, so the cluster outlives it, orphaned. Here such a signal is
remembered and honoured as soon as the Sentinel can be stopped.

This command replaces django-q2's own of the same name (``portal`` comes before ``django_q`` in
``INSTALLED_APPS``), so the systemd unit, the compose file and ``make run`` all get it.
"""

from __future__ import annotations

import os

from django_q.cluster import Cluster
from django_q.management.commands import qcluster


class StopSafeCluster(Cluster):
    """A ``Cluster`` that stops on a signal received at any moment of its life."""

    stop_requested = False

    def sig_handler(self, signum, frame) -> None:
        self.stop_requested = True
        if self.sentinel is None or not self.sentinel.is_alive():
            return  # too early for django-q2's stop(): start() honours the request
        super().sig_handler(signum, frame)

    def start(self) -> int:
        if self.stop_requested:  # signalled before anything was started
            return self.pid
        pid = super().start()
        # Signalled while the Sentinel was being started: stop it now that it runs (has_stopped
        # is set when the handler could already stop it itself).
        if self.stop_requested and not self.has_stopped:
            self.stop()
        return pid


class Command(qcluster.Command):
    def handle(self, *args, **options) -> None:
        # As django-q2's handle(), with the cluster above.
        if options.get("cluster_name"):
            os.environ["Q_CLUSTER_NAME"] = options["cluster_name"]
        cluster = StopSafeCluster()
        cluster.start()
        if options.get("run_once", False):
            cluster.stop()
