"""Control-plane registry: processes register, beat, and age out."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from kernel import registry
from kernel.models import ControlPlaneServer

pytestmark = pytest.mark.django_db


def test_registering_twice_keeps_one_row_per_process_and_role():
    registry.register("web")
    registry.register("web")
    registry.register("scheduler")
    assert sorted(ControlPlaneServer.objects.values_list("role", flat=True)) == ["scheduler", "web"]
    assert registry.server_name("web").endswith(":web")


def test_a_heartbeat_refreshes_last_seen_and_recreates_a_pruned_row():
    server = registry.register("web")
    ControlPlaneServer.objects.filter(pk=server.pk).update(last_seen_at=timezone.now() - timedelta(seconds=100))
    registry.heartbeat("web")
    assert registry.is_alive(ControlPlaneServer.objects.get(pk=server.pk))
    ControlPlaneServer.objects.all().delete()
    registry.heartbeat("web")
    assert ControlPlaneServer.objects.filter(name=registry.server_name("web")).exists()


def test_silent_processes_are_dead_then_pruned():
    registry.register("web")
    now = timezone.now()
    ControlPlaneServer.objects.create(name="h:2:worker", role="worker", hostname="h", pid=2,
                                      last_seen_at=now - timedelta(seconds=registry.dead_after_s() + 1))
    ControlPlaneServer.objects.create(name="h:3:worker", role="worker", hostname="h", pid=3,
                                      last_seen_at=now - timedelta(seconds=registry.PRUNE_AFTER_S + 1))
    assert sorted(s.name for s in registry.alive()) == [registry.server_name("web")]
    assert registry.prune() == 1
    assert ControlPlaneServer.objects.count() == 2


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown control-plane role"):
        registry.register("janitor")


def test_the_admin_lists_control_plane_servers_with_liveness(client, staff):
    registry.register("web")
    ControlPlaneServer.objects.create(name="h:9:scheduler", role="scheduler", hostname="h", pid=9,
                                      last_seen_at=timezone.now() - timedelta(seconds=300))
    client.force_login(staff)
    page = client.get("/admin/portal/controlplaneserver/").content.decode()
    assert registry.server_name("web") in page and "h:9:scheduler" in page
    assert page.count('alt="True"') == 1 and page.count('alt="False"') == 1
