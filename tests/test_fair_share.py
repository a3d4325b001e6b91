"""Fair-share standing from the usage ledger, and the pass ordering by it when the policy is on."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta

import pytest

from nodes.models import GPU
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from scheduling.usage import fair_share_factor, refresh_fair_share, roll_up
from tenants.models import FairShare, Quota

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
HALF_LIFE_H = 2.0


def hold(tenant, node, indexes, start, end=None, status="succeeded"):
    task = Task.objects.create(tenant=tenant, name="t", command="x", status=status)
    for gpu in GPU.objects.filter(node=node, index__in=indexes):
        Allocation.objects.create(task=task, gpu=gpu, node=node, memory_mb=40_000, allocated_at=start,
                                  released_at=end)
    return task


def test_the_factor_is_two_to_the_minus_usage_over_share():
    assert fair_share_factor(0.0, 0.5) == 1.0
    assert fair_share_factor(0.5, 0.5) == 0.5
    assert fair_share_factor(1.0, 0.5) == 0.25
    assert fair_share_factor(0.2, 0.0) == 0.0


def test_running_usage_is_decayed_exactly_and_compared_with_the_quota_share(acme, globex, servers):
    Quota.objects.filter(tenant=globex).update(max_gpus=8)  # equal shares: acme 8, globex 8
    hold(acme, servers[0], [0, 1], NOW - timedelta(hours=2), status="running")
    factors = refresh_fair_share(NOW, HALF_LIFE_H)
    acme_fs = FairShare.objects.get(tenant=acme)
    # 2 GPUs for 2 h = one half-life: 2 x H/ln2 x (1 - 1/2) GPU-seconds.
    assert acme_fs.decayed_gpu_seconds == pytest.approx(2 * 7200 / math.log(2) * 0.5, rel=1e-9)
    assert (acme_fs.usage, acme_fs.share) == (1.0, 0.5)
    assert factors == {acme.pk: 0.25, globex.pk: 1.0}


def test_an_explicit_weight_replaces_the_quota_share(acme, globex, servers):
    Quota.objects.filter(tenant=acme).update(fair_share_weight=3)
    Quota.objects.filter(tenant=globex).update(fair_share_weight=1)
    hold(acme, servers[0], [0], NOW - timedelta(hours=1), NOW)
    hold(globex, servers[0], [1], NOW - timedelta(hours=1), NOW)
    factors = refresh_fair_share(NOW, HALF_LIFE_H)
    # Equal usage (1/2 each); shares 3/4 and 1/4.
    assert factors[acme.pk] == pytest.approx(2 ** (-0.5 / 0.75))
    assert factors[globex.pk] == pytest.approx(2 ** (-0.5 / 0.25))


def test_rolled_up_days_decay_like_the_raw_intervals(acme, globex, servers):
    day = NOW - timedelta(days=1)  # an hour around yesterday's midday
    hold(acme, servers[0], [0], day.replace(hour=11, minute=30), day.replace(hour=12, minute=30))
    hold(globex, servers[0], [1], day.replace(hour=11, minute=50), day.replace(hour=12, minute=10))
    raw = refresh_fair_share(NOW, 24.0)
    raw_seconds = FairShare.objects.get(tenant=acme).decayed_gpu_seconds
    roll_up(NOW)
    rolled = refresh_fair_share(NOW, 24.0)
    assert FairShare.objects.get(tenant=acme).decayed_gpu_seconds == pytest.approx(raw_seconds, rel=1e-3)
    assert rolled == pytest.approx(raw, rel=1e-3)
    assert rolled[acme.pk] < rolled[globex.pk]


def test_with_fair_share_on_the_pass_places_the_tenant_below_its_share_first(acme, globex, servers, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, fair_share=True, online_share=1.0,
                                             batch_share=1.0)
    for node in servers:  # one free GPU in the whole cluster
        GPU.objects.filter(node=node).exclude(node=servers[0], index=0).update(reserved=True)
    Quota.objects.filter(tenant=globex).update(max_gpus=8)
    hold(acme, servers[1], [7], datetime.now(UTC) - timedelta(hours=3), datetime.now(UTC) - timedelta(hours=1))
    refresh_fair_share()
    first = Task.objects.create(tenant=acme, name="acme-first", command="x", gpu_memory_mb=10_000,
                                created_at=datetime.now(UTC) - timedelta(minutes=5))
    later = Task.objects.create(tenant=globex, name="globex-later", command="x", gpu_memory_mb=10_000)
    run_pass(actor="test")
    first.refresh_from_db()
    later.refresh_from_db()
    assert later.status == "assigned"
    assert first.status == "pending"
    assert "fair share: tasks of tenants with a higher factor went first (tenant acme: 0.25)" in first.pending_reason


def test_the_factor_is_shown_in_the_quota_api_and_the_admin(acme, globex, servers, alice, staff, api_client_for,
                                                           client):
    hold(acme, servers[0], [0, 1], NOW - timedelta(hours=2), status="running")
    refresh_fair_share(NOW, HALF_LIFE_H)
    (row,) = api_client_for(alice).get("/api/v1/quota").json()
    assert row["fair_share"]["factor"] == pytest.approx(2 ** (-1 / (8 / 12)), abs=1e-4)
    client.force_login(staff)
    html = client.get("/admin/tenants/tenant/").content.decode()
    assert "Fair-share factor" in html and "0.35 (usage 100% / share 67%)" in html
