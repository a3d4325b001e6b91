"""Operators see the control plane: who holds the scheduler lock right now and since
when (from PostgreSQL's pg_locks, not a row the holder wrote), every process's role,
last pass and load, and the q cluster's workers."""

from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections, connection, transaction

from kernel import control_plane
from kernel.apps import _q_worker_spawned
from kernel.models import ControlPlaneServer
from scheduling.lock import lock_scheduler

pytestmark = pytest.mark.django_db(transaction=True)


class HeldLock:
    """A pass holding the scheduler lock in another thread (its own connection)."""

    def __enter__(self):
        self.held, self.release = threading.Event(), threading.Event()
        self.backend_pid = None
        self.thread = threading.Thread(target=self._hold)
        self.thread.start()
        assert self.held.wait(10)
        return self

    def _hold(self) -> None:
        try:
            with transaction.atomic():
                lock_scheduler()
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    self.backend_pid = cursor.fetchone()[0]
                self.held.set()
                self.release.wait(10)
        finally:
            close_old_connections()

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)


def test_the_lock_holder_is_read_from_pg_locks_with_since_when(db):
    assert control_plane.scheduler_lock() == {"held": False, "holder": None}
    with HeldLock() as held:
        lock = control_plane.scheduler_lock()
        assert lock["held"] and lock["holder"]["backend_pid"] == held.backend_pid
        assert lock["holder"]["since"] is not None and lock["holder"]["held_for_ms"] >= 0
    assert control_plane.scheduler_lock()["held"] is False  # gone with the transaction


def test_a_process_named_by_application_name_maps_to_its_registry_row(db):
    name = control_plane.application_name("gpu-portal-scheduler", "scheduler")
    assert name.endswith(":scheduler") and len(name) <= 63
    connection.close()
    connection.settings_dict["OPTIONS"]["application_name"] = name
    try:
        with transaction.atomic():
            lock_scheduler()
            holder = control_plane.scheduler_lock()["holder"]
    finally:
        connection.close()
        connection.settings_dict["OPTIONS"]["application_name"] = "gpu-portal"
    assert holder["process"] == name.rsplit(" ", 1)[1]


def test_q_cluster_workers_register_in_the_control_plane(db, monkeypatch):
    started: list[str] = []
    monkeypatch.setattr("kernel.registry.start_background", lambda role: started.append(role) or True)
    _q_worker_spawned(sender="django_q", proc_name="MainProcess")
    assert started == []  # a synchronous q cluster runs its worker here: not a worker process
    monkeypatch.setattr("multiprocessing.parent_process", lambda: object())  # as in a spawned worker
    _q_worker_spawned(sender="django_q", proc_name="Worker-1")
    assert started == [ControlPlaneServer.Role.WORKER]
    from kernel import registry

    registry.register(ControlPlaneServer.Role.WORKER)
    assert [p["role"] for p in control_plane.snapshot()["q_workers"]] == ["worker"]
    connection.close()
    connection.settings_dict["OPTIONS"]["application_name"] = "gpu-portal"


def test_staff_see_the_control_plane_in_the_api_and_the_admin(client, staff, alice):
    from kernel import registry

    registry.register(ControlPlaneServer.Role.SCHEDULER, info={"passes": 3, "last_pass_ms": 1.5, "load1": 0.2,
                                                             "last_pass_at": "2026-11-30T04:00:00+00:00"})
    client.force_login(staff)
    with HeldLock() as held:
        body = client.get("/api/v1/cluster").json()
        page = client.get("/admin/cluster/").content.decode()
    plane = body["control_plane"]
    assert plane["scheduler_lock"]["holder"]["backend_pid"] == held.backend_pid
    scheduler = next(p for p in plane["processes"] if p["role"] == "scheduler")
    assert (scheduler["passes"], scheduler["last_pass_ms"], scheduler["load1"]) == (3, 1.5, 0.2)
    assert f"backend {held.backend_pid}" in page and "Control plane" in page

    client.force_login(alice)
    assert "control_plane" not in client.get("/api/v1/cluster").json()
