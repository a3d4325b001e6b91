"""The audit: old -> new values of governance changes, with actor and source, from any path."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from django.urls import reverse
from pghistory.models import Events

from nodes.models import GPU
from tenants.models import Membership, Quota
from tests.conftest import subprocess_env
from tests.test_quota_admin import _post

ROOT = Path(__file__).resolve().parent.parent


def events_of(obj) -> list:
    return list(Events.objects.tracks(obj).order_by("pgh_created_at", "pgh_id"))


@pytest.mark.django_db(transaction=True)
def test_a_quota_change_in_a_django_shell_is_audited_with_old_and_new_values(acme):
    code = ("from tenants.models import Quota; q = Quota.objects.get(tenant__slug='acme'); "
            "q.max_gpus = 16; q.save()")
    proc = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = events_of(Quota.objects.get(tenant=acme))[-1]
    assert last.pgh_label == "update"
    assert last.pgh_diff == {"max_gpus": [8, 16]}
    assert last.pgh_context["source"] == "shell"
    assert last.pgh_context["os_user"]


@pytest.mark.django_db
def test_a_change_in_the_admin_records_the_operator_and_the_source(client, staff, acme):
    client.force_login(staff)
    _post(client, acme, max_gpus="12", max_pending_tasks="1000")
    last = events_of(acme.quota)[-1]
    assert last.pgh_diff == {"max_gpus": [8, 12]}
    assert last.pgh_context["source"] == "admin"
    assert last.pgh_context["username"] == "operator"
    assert last.pgh_context["url"].startswith("/admin/tenants/tenant/")


@pytest.mark.django_db
def test_a_raw_update_is_audited_too(acme):
    Quota.objects.filter(tenant=acme).update(max_running_tasks=3)  # no save(), no signal
    assert events_of(acme.quota)[-1].pgh_diff == {"max_running_tasks": [8, 3]}


@pytest.mark.django_db
def test_memberships_tokens_servers_and_gpus_are_audited(acme, bob, servers, api_client_for):
    membership = Membership.objects.get(user=bob)
    membership.role = Membership.Role.ADMIN
    membership.save()
    assert events_of(membership)[-1].pgh_diff == {"role": ["member", "admin"]}

    node = servers[0]
    node.status = "draining"
    node.save()
    # The status and the operator's intent (kept apart from observed health) change together.
    assert events_of(node)[-1].pgh_diff == {"status": ["active", "draining"], "intent": ["active", "draining"]}

    gpu = GPU.objects.filter(node=node).first()
    gpu.cordon("ECC errors")
    assert events_of(gpu)[-1].pgh_diff == {"cordoned": [False, True], "cordon_reason": ["", "ECC errors"]}
    # A heartbeat's live readings are not governance: no event.
    before = len(events_of(gpu))
    GPU.objects.filter(pk=gpu.pk).update(utilization_pct=77, temperature_c=60)
    assert len(events_of(gpu)) == before

    api_client_for(bob)  # makes a token: an insert event, without the digest
    token = bob.api_tokens.get()
    (created,) = events_of(token)
    assert created.pgh_label == "insert" and "digest" not in created.pgh_data


@pytest.mark.django_db
def test_revoking_a_token_in_the_portal_is_audited_as_the_portal(client, bob):
    from portal.api.authentication import create_token

    row, _ = create_token(bob, "laptop")
    client.force_login(bob)
    client.post(reverse("portal:token-revoke", args=[row.pk]))
    last = events_of(row)[-1]
    assert last.pgh_diff == {"enabled": [True, False]}
    assert (last.pgh_context["source"], last.pgh_context["username"]) == ("portal", "bob")


@pytest.mark.django_db
def test_the_admin_log_is_searchable_per_object_and_exportable(client, staff, acme, globex):
    # First: inside a test's one transaction, a request's context (transaction-local
    # settings) would otherwise stay attached to later writes.
    Quota.objects.filter(tenant=globex).update(max_gpus=1)
    client.force_login(staff)
    _post(client, acme, max_gpus="12", max_pending_tasks="1000")
    url = reverse("admin:pghistory_events_changelist")

    page = client.get(url, {"q": "operator"})
    assert page.status_code == 200
    html = page.content.decode()
    assert "max_gpus: 8 → 12" in html and "max_gpus: 4 → 1" not in html

    per_object = client.get(url, {"obj": f"tenants.Quota:{globex.quota.pk}", "method": "tracks"}).content.decode()
    assert "max_gpus: 4 → 1" in per_object and "max_gpus: 8 → 12" not in per_object
    # An audited object's change page links to its events.
    change = client.get(reverse("admin:tenants_tenant_change", args=[acme.pk])).content.decode()
    assert f"obj=tenants.Tenant:{acme.pk}" in change

    slugs = [e.pgh_slug for e in Events.objects.all()]
    export = client.post(url, {"action": "export_csv", "_selected_action": slugs})
    assert export["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    changes = {(r["model"], r["source"], r["changes"]) for r in rows}
    assert ("tenants.Quota", "admin", "max_gpus: 8 → 12") in changes
    assert ("tenants.Quota", "system", "max_gpus: 4 → 1") in changes



@pytest.mark.django_db
def test_a_reservations_life_and_a_booking_policy_are_audited(acme, staff):
    from datetime import timedelta

    from django.utils import timezone

    from scheduling.models import Reservation, ReservationPolicy

    start = timezone.now() + timedelta(days=1)
    booking = Reservation.objects.create(name="paper-deadline", tenant=acme, gpu_count=8, starts_at=start,
                                         ends_at=start + timedelta(days=3))
    Reservation.objects.filter(pk=booking.pk).update(state=Reservation.State.APPROVED, decided_by=staff)
    created, approved = events_of(booking)
    assert created.pgh_label == "insert" and created.pgh_data["gpu_count"] == 8
    assert approved.pgh_diff == {"state": ["requested", "approved"], "decided_by_id": [None, staff.pk]}

    policy = ReservationPolicy.objects.create(tenant=acme, auto_approve_gpu_hours_per_week=0)
    policy.auto_approve_gpu_hours_per_week = 200
    policy.save()
    assert events_of(policy)[-1].pgh_diff == {"auto_approve_gpu_hours_per_week": [0, 200]}
