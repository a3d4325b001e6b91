"""Temporary quota grants: requested by a tenant admin, approved by staff, applied by the
pass's clock exactly over [starts_at, ends_at), with a notice at each bound."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from kernel.models import Alert
from scheduling import grants
from scheduling.choices import TaskStatus
from scheduling.models import Task
from scheduling.passes import load_snapshot, run_pass
from scheduling.quotas import quota_report
from scheduling.sweep import sweep
from tenants.models import Limits, QuotaGrant, effective_limits

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
T1 = datetime(2026, 12, 1, 17, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)


def make_grant(tenant, start=T0, end=T1, state=QuotaGrant.State.APPROVED, **extra) -> QuotaGrant:
    extra = extra or {"extra_gpus": 4}
    return QuotaGrant.objects.create(tenant=tenant, starts_at=start, ends_at=end, reason="paper deadline",
                                     state=state, **extra)


def test_effective_limits_add_approved_grants_inside_their_window_only():
    base = Limits(8, 640_000, 8)
    g = QuotaGrant(extra_gpus=4, extra_gpu_memory_mb=100, extra_running_tasks=2, starts_at=T0, ends_at=T1,
                   state=QuotaGrant.State.APPROVED)
    asked = QuotaGrant(extra_gpus=50, starts_at=T0, ends_at=T1, state=QuotaGrant.State.REQUESTED)
    assert effective_limits(base, [g, asked], T0 - TICK) == base
    assert effective_limits(base, [g, asked], T0) == Limits(12, 640_100, 10)
    assert effective_limits(base, [g, asked], T1 - TICK) == Limits(12, 640_100, 10)
    assert effective_limits(base, [g, asked], T1) == base


@pytest.mark.django_db
def test_the_snapshot_applies_a_grant_exactly_at_its_bounds(acme, globex):
    make_grant(acme, extra_gpus=4, extra_running_tasks=1)
    make_grant(acme, state=QuotaGrant.State.REJECTED, extra_gpus=100)

    def limits(now):
        t = load_snapshot(now).snapshot.tenants[acme.pk]
        return (t.max_gpus, t.max_running_tasks)

    assert limits(T0 - TICK) == (8, 8)
    assert limits(T0) == (12, 9)
    assert limits(T1 - TICK) == (12, 9)
    assert limits(T1) == (8, 8)
    assert load_snapshot(T0).snapshot.tenants[globex.pk].max_gpus == 4


@pytest.mark.django_db
def test_a_pass_places_beyond_the_base_quota_only_while_the_grant_is_active(acme, servers):
    now = timezone.now()
    shape = {"command": "true", "gpu_count": 5, "gpu_memory_mb": 1000, "workload_class": "online"}
    Task.objects.create(tenant=acme, name="first", **shape)
    task = Task.objects.create(tenant=acme, name="second", **shape)
    run_pass()
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING and "near its GPU quota (5/8)" in task.pending_reason
    grant = make_grant(acme, start=now - timedelta(hours=1), end=now + timedelta(hours=1),
                       state=QuotaGrant.State.REQUESTED)
    run_pass()
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING  # requested, not approved: no effect
    staff_user = _staff()
    grants.decide(grant.pk, approve=True, by=staff_user)
    run_pass()
    task.refresh_from_db()
    assert task.status == TaskStatus.ASSIGNED


def _staff():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("op2", is_staff=True)


@pytest.mark.django_db(transaction=True)
def test_the_sweep_stamps_applied_and_expired_once_with_a_notice_and_wakes_the_scheduler(acme, monkeypatch):
    wakes: list[str] = []
    monkeypatch.setattr("scheduling.triggers.wake", lambda reason: wakes.append(reason) or False)
    now = timezone.now()
    live = make_grant(acme, start=now - timedelta(minutes=1), end=now + timedelta(hours=1))
    done = make_grant(acme, start=now - timedelta(hours=2), end=now - timedelta(hours=1), extra_running_tasks=3,
                      extra_gpus=0)
    later = make_grant(acme, start=now + timedelta(hours=1), end=now + timedelta(hours=2))

    result = sweep()
    assert result.grants_changed == 2
    for g in (live, done, later):
        g.refresh_from_db()
    assert live.applied_at is not None and live.expired_at is None
    assert done.expired_at is not None
    assert later.applied_at is None and later.expired_at is None
    texts = set(Alert.objects.filter(kind=Alert.Kind.QUOTA_GRANT).values_list("message", flat=True))
    assert texts == {f"quota grant #{done.pk} for acme expired: +3 running tasks no longer apply",
                     f"quota grant #{live.pk} for acme applied: +4 GPUs until "
                     f"{live.ends_at:%Y-%m-%d %H:%M} UTC (paper deadline)"}
    assert len(wakes) == 1 and "2 quota grant(s) changed" in wakes[0]
    assert sweep().grants_changed == 0  # once each
    assert len(wakes) == 1


@pytest.mark.django_db
def test_a_tenant_admin_requests_a_grant_and_staff_approve_it_in_the_admin(client, acme, alice, bob, staff):
    client.force_login(alice)
    start, end = timezone.now() + timedelta(days=1), timezone.now() + timedelta(days=30)
    r = client.post(reverse("portal:grants"), {
        "tenant": "acme", "extra_gpus": "4", "extra_gpu_memory_mb": "0", "extra_running_tasks": "0",
        "starts_at": start.strftime("%Y-%m-%d %H:%M"), "ends_at": end.strftime("%Y-%m-%d %H:%M"),
        "reason": "new student"})
    assert r.status_code == 302
    grant = QuotaGrant.objects.get()
    assert (grant.state, grant.requested_by, grant.extra_gpus) == ("requested", alice, 4)
    page = client.get(reverse("portal:grants")).content.decode()
    assert "new student" in page and "requested" in page

    client.force_login(staff)
    r = client.post(reverse("admin:tenants_quotagrant_changelist"),
                    {"action": "approve", "_selected_action": [grant.pk]})
    assert r.status_code == 302
    grant.refresh_from_db()
    assert (grant.state, grant.decided_by) == ("approved", staff)
    assert "upcoming" in client.get(reverse("admin:tenants_quotagrant_changelist")).content.decode()


@pytest.mark.django_db
def test_a_member_may_not_request_and_bad_input_gets_field_messages(client, acme, bob, alice):
    client.force_login(bob)
    r = client.post(reverse("portal:grants"), {"tenant": "acme", "extra_gpus": "4", "reason": "x",
                                               "starts_at": "2030-01-01 00:00", "ends_at": "2030-01-02 00:00"})
    assert r.status_code == 400 and QuotaGrant.objects.count() == 0
    client.force_login(alice)
    r = client.post(reverse("portal:grants"), {"tenant": "acme", "extra_gpus": "0", "extra_gpu_memory_mb": "0",
                                               "extra_running_tasks": "0", "reason": "x",
                                               "starts_at": "2030-01-02 00:00", "ends_at": "2030-01-01 00:00"})
    body = r.content.decode()
    assert r.status_code == 400
    assert "The window must end after it starts." in body and "Ask for at least one extra" in body
    assert QuotaGrant.objects.count() == 0


@pytest.mark.django_db
def test_quota_report_and_dashboard_show_the_effective_quota(client, acme, alice):
    now = timezone.now()
    g = make_grant(acme, start=now - timedelta(hours=1), end=now + timedelta(hours=1))
    row = quota_report(alice)[0]
    assert row["limits"]["max_gpus"] == 12 and row["base_limits"]["max_gpus"] == 8
    assert [(x["id"], x["status"]) for x in row["grants"]] == [(g.pk, "active")]
    assert quota_report(alice, now=now + timedelta(hours=2))[0]["limits"]["max_gpus"] == 8
    client.force_login(alice)
    page = client.get(reverse("portal:dashboard")).content.decode()
    assert "/ 12" in page and f"Quota grant #{g.pk} active: +4 GPUs" in page
    api = client.get("/api/v1/quota").json()
    assert api[0]["limits"]["max_gpus"] == 12 and api[0]["grants"][0]["status"] == "active"


@pytest.mark.django_db
def test_the_admin_tenant_list_shows_the_effective_quota(client, acme, staff):
    now = timezone.now()
    make_grant(acme, start=now - timedelta(hours=1), end=now + timedelta(hours=1), extra_gpus=4)
    make_grant(acme, start=now + timedelta(hours=1), end=now + timedelta(hours=2), extra_gpus=50)
    client.force_login(staff)
    page = client.get("/admin/tenants/tenant/").content.decode()
    assert "0 / 12 (incl. +4 granted)" in page and "/ 640000 MB" in page
