"""/api/v1/reservations and /api/v1/quota-grants: approval states through the API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from scheduling.models import Reservation, Task
from tenants.models import QuotaGrant

pytestmark = pytest.mark.django_db


def window(days=1, hours=24):
    start = timezone.now() + timedelta(days=days)
    return {"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=hours)).isoformat()}


def test_reservation_request_approve_release_through_the_api(api_client_for, alice, bob, staff, servers, carol):
    a = api_client_for(alice)
    r = a.post("/api/v1/reservations", {"name": "paper-deadline", "tenant": "acme", "gpu_count": 8,
                                        "nodes": ["gpu-02"], "reason": "NeurIPS", **window()}, format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert (body["state"], body["status"], body["requested_by"]) == ("requested", "requested", "alice")
    rid = body["id"]

    assert a.post(f"/api/v1/reservations/{rid}/approve", format="json").status_code == 403
    assert api_client_for(carol).get(f"/api/v1/reservations/{rid}").status_code == 404
    s = api_client_for(staff)
    r = s.post(f"/api/v1/reservations/{rid}/approve", {"note": "good luck"}, format="json")
    assert r.status_code == 200 and r.json()["status"] == "upcoming" and r.json()["decided_by"] == "operator"
    assert set(Reservation.objects.get().slots.values_list("gpu__node__name", flat=True)) == {"gpu-02"}
    r = s.post(f"/api/v1/reservations/{rid}/approve", format="json")
    assert r.status_code == 400 and r.json() == {"state": ["reservation paper-deadline was already approved"]}

    # Tasks name it like Slurm's --reservation; other tenants' reservations are not theirs to name.
    r = api_client_for(bob).post("/api/v1/tasks", {"command": "true", "reservation": "paper-deadline"},
                                 format="json")
    assert r.status_code == 201 and Task.objects.get().reservation_id == rid
    r = api_client_for(carol).post("/api/v1/tasks", {"command": "true", "reservation": "paper-deadline"},
                                   format="json")
    assert r.status_code == 400 and r.json()["reservation"] == ["No reservation 'paper-deadline' of this tenant."]

    assert api_client_for(bob).post(f"/api/v1/reservations/{rid}/release").status_code == 403
    r = a.post(f"/api/v1/reservations/{rid}/release")
    assert r.status_code == 200 and r.json()["released"] == 8 and r.json()["reservation"]["state"] == "released"


def test_bad_reservation_input_gets_field_messages(api_client_for, alice, servers):
    a = api_client_for(alice)
    r = a.post("/api/v1/reservations", {"name": "bad name!", "tenant": "nope", "gpu_count": 0,
                                        "starts_at": "tomorrow", "ends_at": None, "nodes": "gpu-01"},
               format="json")
    assert r.status_code == 400 and r.json() == {"nodes": ["A list of server names."]}
    r = a.post("/api/v1/reservations", {"name": "bad name!", "tenant": "nope", "gpu_count": 0,
                                        "starts_at": "tomorrow"}, format="json")
    errors = r.json()
    assert r.status_code == 400 and {"name", "tenant", "gpu_count", "starts_at", "ends_at"} <= set(errors)
    r = a.post("/api/v1/reservations", [1, 2], format="json")
    assert r.status_code == 400
    r = a.post("/api/v1/reservations", {"name": "huge", "tenant": "acme", "gpu_count": 40, **window()},
               format="json")
    assert r.status_code == 400
    assert r.json()["non_field_errors"][0].startswith("conflict: only 16 of the 16 matching GPUs are free")


def test_quota_grant_request_and_approval_through_the_api(api_client_for, alice, bob, staff):
    a = api_client_for(alice)
    r = a.post("/api/v1/quota-grants", {"tenant": "acme", "extra_gpus": 4, "reason": "new student",
                                        **window(days=0, hours=48)}, format="json")
    assert r.status_code == 201, r.json()
    gid = r.json()["id"]
    assert r.json()["status"] == "requested"
    r = api_client_for(bob).post("/api/v1/quota-grants", {"tenant": "acme", "extra_gpus": 1, "reason": "x",
                                                          **window()}, format="json")
    assert r.status_code == 400 and "tenant" in r.json()
    assert a.post(f"/api/v1/quota-grants/{gid}/approve").status_code == 403
    r = api_client_for(staff).post(f"/api/v1/quota-grants/{gid}/approve")
    assert r.status_code == 200 and r.json()["state"] == "approved"
    assert QuotaGrant.objects.get().decided_by == staff
    quota = a.get("/api/v1/quota").json()[0]
    assert quota["limits"]["max_gpus"] == 12 and quota["base_limits"]["max_gpus"] == 8
    assert [g["status"] for g in a.get("/api/v1/quota-grants").json()] == ["active"]


def test_the_openapi_schema_lists_the_planning_endpoints(client):
    schema = client.get("/api/schema/").content
    for path in (b"/api/v1/reservations/{id}/approve", b"/api/v1/reservations/{id}/release",
                 b"/api/v1/quota-grants/{id}/approve", b"/api/v1/quota-grants/{id}/reject"):
        assert path in schema


def test_what_if_through_the_api_is_staff_only_and_saves_nothing(api_client_for, alice, staff, servers, acme):
    a, s = api_client_for(alice), api_client_for(staff)
    rid = a.post("/api/v1/reservations", {"name": "paper-deadline", "gpu_count": 4, **window()},
                 format="json").json()["id"]
    assert a.post(f"/api/v1/reservations/{rid}/simulate").status_code == 403
    r = s.post(f"/api/v1/reservations/{rid}/simulate")
    assert r.status_code == 200 and r.json()["would_start"] == [] and r.json()["overlapping_running"] == []
    assert Reservation.objects.get().state == "requested" and not Reservation.objects.get().slots.exists()
    Task.objects.create(tenant=acme, name="big", command="true", gpu_count=2, gpu_memory_mb=1000)
    assert a.post("/api/v1/quota/what-if", {"tenant": "acme", "max_gpus": 0}, format="json").status_code == 403
    r = s.post("/api/v1/quota/what-if", {"tenant": "acme", "max_gpus": 0}, format="json")
    assert r.status_code == 200
    assert r.json()["keep_waiting"][0]["reason"] == "tenant acme at its GPU quota (0/0)"
    assert s.post("/api/v1/quota/what-if", {"tenant": "nope"}, format="json").json() == {"tenant": ["Unknown tenant."]}
    gid = a.post("/api/v1/quota-grants", {"extra_gpus": 1, "reason": "x", **window()}, format="json").json()["id"]
    assert s.post(f"/api/v1/quota-grants/{gid}/simulate").status_code == 200
    assert QuotaGrant.objects.get().state == "requested"
