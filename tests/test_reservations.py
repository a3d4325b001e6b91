"""Reservations end to end in the database: request, conflicts refused with the reason,
approval books GPUs, the pass keeps them for their tenant, release gives unused ones back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.urls import reverse
from django.utils import timezone

from scheduling import reservations
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Reservation, ReservationPolicy, ReservationSlot, Task
from scheduling.passes import load_snapshot, run_pass
from scheduling.sweep import sweep

pytestmark = pytest.mark.django_db


def fmt(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M")


def ask(user, name="paper-deadline", tenant="acme", gpus=8, start=None, hours=72, **extra) -> Reservation:
    start = start or timezone.now() + timedelta(days=1)
    data = {"name": name, "tenant": tenant, "gpu_count": gpus, "starts_at": fmt(start),
            "ends_at": fmt(start + timedelta(hours=hours)), "repeat_weeks": 0, "reason": "NeurIPS",
            "node_selector": "{}", **extra}
    form = reservations.ReservationRequestForm(data, user=user)
    assert form.is_valid(), form.errors
    return reservations.request(form)


def test_approval_books_whole_servers_first_and_conflicts_are_refused_with_the_reason(alice, carol, staff, servers,
                                                                                        globex):
    res = ask(alice, gpus=8)
    assert res.state == "requested" and not res.slots.exists()
    res = reservations.decide(res.pk, approve=True, by=staff)
    booked = list(res.slots.values_list("gpu__node__name", flat=True))
    assert res.state == "approved" and len(booked) == 8 and set(booked) == {"gpu-01"}

    carol.memberships.update(role="admin")
    with pytest.raises(reservations.ReservationError) as refused:
        ask(carol, name="other", tenant="globex", gpus=10, start=res.starts_at + timedelta(hours=5), hours=2)
    assert str(refused.value).startswith("conflict: only 8 of the 16 matching GPUs are free over that window, 10 "
                                         "asked; paper-deadline (acme) books 8 of them from ")
    assert not Reservation.objects.filter(name="other").exists()


def test_the_database_refuses_two_bookings_of_one_gpu_for_overlapping_times(alice, staff, servers):
    res = reservations.decide(ask(alice, gpus=1).pk, approve=True, by=staff)
    slot = res.slots.get()
    with pytest.raises(IntegrityError):
        ReservationSlot.objects.create(reservation=res, gpu_id=slot.gpu_id,
                                       period=DateTimeTZRange(slot.period.lower + timedelta(hours=1),
                                                              slot.period.upper + timedelta(hours=1)))


def test_inside_the_window_another_tenants_task_waits_and_the_owner_runs_there(alice, carol, staff, servers):
    start = timezone.now() - timedelta(minutes=5)
    res = reservations.decide(ask(alice, gpus=16, start=start, hours=2).pk, approve=True, by=staff)
    theirs = Task.objects.create(tenant=carol.tenants.get(), name="t", command="true", gpu_count=1,
                                 gpu_memory_mb=1000)
    mine = Task.objects.create(tenant=alice.tenants.get(), name="m", command="true", gpu_count=1,
                               gpu_memory_mb=1000, reservation=res)
    run_pass()
    theirs.refresh_from_db()
    mine.refresh_from_db()
    assert theirs.status == TaskStatus.PENDING
    assert theirs.pending_reason.startswith("free GPUs are booked by reservation paper-deadline until ")
    assert mine.status == TaskStatus.ASSIGNED
    assert set(Allocation.objects.filter(task=mine).values_list("gpu_id", flat=True)) <= set(
        res.slots.values_list("gpu_id", flat=True))


def test_a_named_task_waits_with_the_start_then_the_sweep_wakes_the_pass_at_the_start(alice, staff, servers,
                                                                                          monkeypatch):
    start = timezone.now() + timedelta(hours=2, minutes=1)
    res = reservations.decide(ask(alice, gpus=2, start=start, hours=1).pk, approve=True, by=staff)
    assert res.next_bound_at == res.starts_at
    task = Task.objects.create(tenant=alice.tenants.get(), name="m", command="true", gpu_count=2,
                               gpu_memory_mb=1000, reservation=res)
    run_pass()
    task.refresh_from_db()
    assert task.pending_reason == "waiting for reservation paper-deadline, starts in 2 h"
    # The snapshot at the window's start (the pass's clock) places it there.
    snap = load_snapshot(res.starts_at).snapshot
    from scheduling.placement import schedule

    assert [p.task_id for p in schedule(snap).placements] == [task.pk]
    # The sweep wakes the scheduler once the bound has passed, and moves on to the end.
    Reservation.objects.filter(pk=res.pk).update(next_bound_at=timezone.now() - timedelta(days=1))
    wakes: list[str] = []
    monkeypatch.setattr("scheduling.triggers.request_pass", lambda reason: wakes.append(reason))
    assert sweep().reservation_bounds == 1
    assert len(wakes) == 1 and "1 reservation window(s) opened or closed" in wakes[0]
    res.refresh_from_db()
    assert res.next_bound_at == res.starts_at


def test_the_policy_approves_small_requests_on_the_spot(alice, servers, acme):
    ReservationPolicy.objects.create(tenant=acme, auto_approve_gpu_hours_per_week=20)
    small = ask(alice, name="small", gpus=2, hours=8)  # 16 GPU-hours
    assert small.state == "approved" and small.slots.count() == 2
    assert small.decision_note == "approved by the tenant's reservation policy"
    big = ask(alice, name="big", gpus=1, hours=5, start=timezone.now() + timedelta(days=2))  # 16 + 5 > 20
    assert big.state == "requested"


def test_release_gives_back_the_gpus_the_tenant_does_not_use(alice, staff, servers):
    res = reservations.decide(ask(alice, gpus=4, start=timezone.now() - timedelta(minutes=1), hours=4).pk,
                              approve=True, by=staff)
    task = Task.objects.create(tenant=alice.tenants.get(), name="m", command="true", gpu_count=1,
                               gpu_memory_mb=1000, reservation=res)
    run_pass()
    task.refresh_from_db()
    assert task.status == TaskStatus.ASSIGNED
    assert reservations.release_unused(res.pk, by=alice) == 3
    assert list(res.slots.values_list("gpu_id", flat=True)) == list(
        Allocation.objects.filter(task=task).values_list("gpu_id", flat=True))


def test_the_pages_request_list_and_release(client, alice, bob, servers):
    client.force_login(alice)
    start = timezone.now() + timedelta(days=1)
    r = client.post(reverse("portal:reservations"), {
        "name": "paper-deadline", "tenant": "acme", "gpu_count": "4", "starts_at": fmt(start),
        "ends_at": fmt(start + timedelta(days=3)), "repeat_weeks": "0", "reason": "deadline", "node_selector": "{}"})
    assert r.status_code == 302
    page = client.get(reverse("portal:reservations")).content.decode()
    assert "paper-deadline" in page and "requested" in page
    r = client.post(reverse("portal:reservations"), {"name": "x", "tenant": "acme", "gpu_count": "99",
                                                     "starts_at": fmt(start), "ends_at": fmt(start),
                                                     "node_selector": "{}", "repeat_weeks": "0"})
    assert r.status_code == 400 and "The window must end after it starts." in r.content.decode()
    client.force_login(bob)
    r = client.post(reverse("portal:reservations"), {"name": "y", "tenant": "acme", "gpu_count": "1",
                                                     "starts_at": fmt(start),
                                                     "ends_at": fmt(start + timedelta(hours=1)),
                                                     "node_selector": "{}", "repeat_weeks": "0"})
    assert r.status_code == 400 and "Only a tenant admin may request a reservation." in r.content.decode()
    assert list(Reservation.objects.values_list("name", flat=True)) == ["paper-deadline"]


def test_calendar_events_show_bookings_and_free_capacity(client, alice, carol, staff, servers):
    start = (timezone.now() + timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)
    reservations.decide(ask(alice, gpus=6, start=start, hours=4).pk, approve=True, by=staff)
    client.force_login(carol)
    day = start.replace(hour=0)
    evs = client.get(reverse("portal:calendar-events"),
                     {"start": day.isoformat(), "end": (day + timedelta(days=1)).isoformat()}).json()
    booked = [e for e in evs if e["extendedProps"].get("state") == "approved"]
    free = [e for e in evs if "free" in e["extendedProps"]]
    assert [b["title"] for b in booked] == ["paper-deadline · acme · 6 GPUs (gpu-01)"]
    assert [f["title"] for f in free] == ["10 of 16 GPUs free"]
    assert client.get(reverse("portal:calendar-events"), {"start": "x", "end": "y"}).status_code == 400
    assert client.get(reverse("portal:calendar-events"), {"start": "2026-13-01", "end": "y"}).status_code == 400
    naive = client.get(reverse("portal:calendar-events"), {"start": "2030-01-01T00:00", "end": "2030-01-03T00:00"})
    assert naive.status_code == 200 and [e["title"] for e in naive.json()] == ["16 of 16 GPUs free"] * 2
    assert client.get(reverse("portal:calendar")).status_code == 200


def test_a_weekly_reservation_books_every_occurrence_and_the_snapshot_sees_the_next(alice, staff, servers, carol):
    start = timezone.now() + timedelta(hours=1)
    res = reservations.decide(ask(alice, name="weekly-sync", gpus=2, start=start, hours=3, repeat_weeks=2).pk,
                              approve=True, by=staff)
    periods = sorted({s.period.lower for s in res.slots.all()})
    assert len(periods) == 3 and periods[2] - periods[0] == timedelta(weeks=2)
    windows = load_snapshot(start + timedelta(weeks=1, hours=4)).snapshot.reservations
    assert [(w.name, w.starts_at) for w in windows] == [("weekly-sync", periods[2])]
    # Another tenant's one-off over the second occurrence cannot take those GPUs.
    carol.memberships.update(role="admin")
    with pytest.raises(reservations.ReservationError):
        ask(carol, name="clash", tenant="globex", gpus=16, start=start + timedelta(weeks=1), hours=1)
    form = reservations.ReservationRequestForm(
        {"name": "too-long", "tenant": "acme", "gpu_count": 1, "starts_at": fmt(start),
         "ends_at": fmt(start + timedelta(days=8)), "repeat_weeks": 1, "node_selector": "{}"}, user=alice)
    assert not form.is_valid() and form.errors["repeat_weeks"] == [
        "A weekly reservation's window lasts at most a week."]


def test_a_decided_reservation_cannot_be_edited_in_the_admin(client, alice, staff, servers):
    res = reservations.decide(ask(alice, gpus=1).pk, approve=True, by=staff)
    client.force_login(staff)
    page = client.get(f"/admin/scheduling/reservation/{res.pk}/change/").content.decode()
    assert 'name="starts_at' not in page and 'name="gpu_count"' not in page
    requested = ask(alice, name="later", gpus=1, start=timezone.now() + timedelta(days=5))
    page = client.get(f"/admin/scheduling/reservation/{requested.pk}/change/").content.decode()
    assert 'name="gpu_count"' in page


def test_the_admin_calendar_page_is_staff_only(client, alice, staff, servers):
    client.force_login(alice)
    assert client.get("/admin/calendar/").status_code == 302
    client.force_login(staff)
    page = client.get("/admin/calendar/").content.decode()
    assert 'id="calendar"' in page and "fullcalendar-6.1.19/index.global.min.js" in page
    assert "/admin/calendar/" in client.get("/admin/").content.decode()
