"""What-if: the answer agrees with what the next pass does after saving the same change,
and nothing is written by asking."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from scheduling import reservations, whatif
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Reservation, Task
from scheduling.passes import run_pass
from tenants.models import Quota, QuotaGrant

pytestmark = pytest.mark.django_db


def tasks(tenant, n, gpus=2, **extra) -> list[Task]:
    return [Task.objects.create(tenant=tenant, name=f"job{i}", command="true", gpu_count=gpus, gpu_memory_mb=1000,
                                workload_class="online", **extra) for i in range(n)]


def test_a_quota_what_if_matches_the_next_pass_and_writes_nothing(acme, servers):
    queued = tasks(acme, 6)  # 12 GPUs asked; quota 8 lets 4 tasks run
    run_pass()
    assert Task.objects.filter(status=TaskStatus.ASSIGNED).count() == 4

    answer = whatif.simulate(whatif.quota_change(acme.pk, max_gpus=10, max_running_tasks=5))
    assert Quota.objects.get(tenant=acme).max_gpus == 8  # nothing saved
    assert Task.objects.filter(status=TaskStatus.ASSIGNED).count() == 4
    predicted = [s["task"] for s in answer["would_start"]]
    assert len(predicted) == 1 and predicted[0] in {t.pk for t in queued}
    assert [w["reason"] for w in answer["keep_waiting"]] == ["tenant acme at its running-task quota (5/5)"]

    Quota.objects.filter(tenant=acme).update(max_gpus=10, max_running_tasks=5)
    result = run_pass()
    assert result.placed_task_ids == predicted


def test_lowering_a_quota_lists_running_tasks_over_it_and_kills_nothing(acme, servers):
    tasks(acme, 3)
    run_pass()
    running = sorted(Task.objects.filter(status=TaskStatus.ASSIGNED).values_list("pk", flat=True))
    answer = whatif.simulate(whatif.quota_change(acme.pk, max_gpus=2))
    assert answer["over_quota"] == [{"tenant": "acme", "over": ["GPUs 6 > 2"], "running_tasks": running}]
    assert Allocation.objects.filter(released_at__isnull=True).count() == 6


def test_a_grant_what_if_matches_the_next_pass_after_approval(acme, servers, staff):
    tasks(acme, 6)
    run_pass()
    now = timezone.now()
    grant = QuotaGrant.objects.create(tenant=acme, extra_gpus=2, extra_running_tasks=1, reason="deadline",
                                      starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=1))
    answer = whatif.simulate(whatif.grant_approval(grant.pk))
    grant.refresh_from_db()
    assert grant.state == "requested"
    from scheduling import grants

    grants.decide(grant.pk, approve=True, by=staff)
    assert run_pass().placed_task_ids == [s["task"] for s in answer["would_start"]] != []


def test_a_reservation_what_if_lists_overlapping_work_and_matches_the_next_pass(acme, globex, alice, carol, staff,
                                                                                servers):
    # globex runs a long task on gpu-01; acme asks for gpu-01 from now on.
    long = tasks(globex, 1, gpus=4, timeout_s=86_400)[0]
    run_pass()
    long.refresh_from_db()
    waiting = tasks(globex, 2, gpus=4, timeout_s=86_400)
    start = timezone.now() + timedelta(minutes=30)
    form = reservations.ReservationRequestForm(
        {"name": "paper-deadline", "tenant": "acme", "gpu_count": 8, "nodes": ["gpu-01", "gpu-02"],
         "starts_at": start.strftime("%Y-%m-%d %H:%M"), "ends_at": (start + timedelta(days=1)).strftime(
             "%Y-%m-%d %H:%M"), "repeat_weeks": 0, "node_selector": "{}"}, user=alice)
    assert form.is_valid(), form.errors
    res = reservations.request(form)
    answer = whatif.simulate(whatif.reservation_approval(res.pk))
    res.refresh_from_db()
    assert res.state == "requested" and not res.slots.exists()
    booked_node = {o["task"] for o in answer["overlapping_running"]}
    # The booking takes whole servers first: gpu-02 (8 free) books no running task; if the
    # booking had touched gpu-01, globex's long task would be listed.
    assert booked_node == set()
    assert {w["task"] for w in answer["keep_waiting"]} == {t.pk for t in waiting}

    reservations.decide(res.pk, approve=True, by=staff)
    assert run_pass().placed_task_ids == [s["task"] for s in answer["would_start"]]
    assert Reservation.objects.get().state == "approved"


def test_a_reservation_over_running_work_names_it(acme, globex, alice, staff, servers):
    long = tasks(globex, 1, gpus=4, timeout_s=86_400)[0]
    run_pass()
    long.refresh_from_db()
    node = long.node.name  # 4 of its 8 GPUs held for a day: a 6-GPU booking there takes 2 of them
    start = timezone.now() + timedelta(minutes=30)
    form = reservations.ReservationRequestForm(
        {"name": "on-busy", "tenant": "acme", "gpu_count": 6, "nodes": [node], "repeat_weeks": 0,
         "starts_at": start.strftime("%Y-%m-%d %H:%M"),
         "ends_at": (start + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M"), "node_selector": "{}"}, user=alice)
    assert form.is_valid(), form.errors
    res = reservations.request(form)
    answer = whatif.simulate(whatif.reservation_approval(res.pk))
    overlapping = [(o["task"], o["tenant"], len(o["gpus"])) for o in answer["overlapping_running"]]
    assert overlapping == [(long.pk, "globex", 2)]


def test_the_admin_simulate_buttons_show_the_answer_and_save_nothing(client, acme, staff, servers):
    tasks(acme, 6)
    run_pass()
    client.force_login(staff)
    form = client.get(f"/admin/tenants/tenant/{acme.pk}/change/").content.decode()
    assert f'formaction="/admin/what-if/quota/{acme.pk}/"' in form
    page = client.post(f"/admin/what-if/quota/{acme.pk}/", {"quota-0-max_gpus": "2", "quota-0-max_running_tasks": "8"})
    body = page.content.decode()
    assert page.status_code == 200 and "If you save quota of acme: max_gpus = 2, max_running_tasks = 8" in body
    assert "GPUs 8 &gt; 2" in body and Quota.objects.get(tenant=acme).max_gpus == 8
    for junk in ("lots", "99999999999999999"):
        bad = client.post(f"/admin/what-if/quota/{acme.pk}/", {"quota-0-max_gpus": junk})
        assert bad.status_code == 400 and "max_gpus: a whole number" in bad.content.decode()

    now = timezone.now()
    grant = QuotaGrant.objects.create(tenant=acme, extra_gpus=4, extra_running_tasks=2, reason="x",
                                      starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=1))
    r = client.post("/admin/tenants/quotagrant/", {"action": "simulate", "_selected_action": [grant.pk]})
    assert r.status_code == 302 and r["Location"] == f"/admin/what-if/?grant={grant.pk}"
    body = client.get(r["Location"]).content.decode()
    # +4 GPUs and +2 tasks, but the online share (11 of 16 GPUs) leaves room for one more.
    assert "Would start now (1)" in body and "online share of the cluster full (70%)" in body
    grant.refresh_from_db()
    assert grant.state == "requested"
