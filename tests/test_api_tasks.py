"""Users' task API: submit (one and batch), list, detail, cancel, events, logs."""

from __future__ import annotations

import pytest
from django.conf import settings

from nodes.models import GPU
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskEvent, TaskLogChunk
from tenants.choices import Priority
from tenants.models import Quota

pytestmark = pytest.mark.django_db


@pytest.fixture
def as_alice(api_client_for, alice, servers):
    return api_client_for(alice)


@pytest.fixture
def as_bob(api_client_for, bob, servers):
    return api_client_for(bob)


def submit(client, **fields):
    return client.post("/api/v1/tasks", {"command": "python train.py", **fields}, format="json")


def test_a_submitted_task_is_pending_with_an_event_and_the_default_timeout(as_alice, alice):
    r = submit(as_alice, name="train", gpu_count=2, gpu_memory_mb=40_000, priority="high")
    assert r.status_code == 201, r.content
    task = Task.objects.get(pk=r.json()["id"])
    assert (task.status, task.attempt, task.gpu_count, task.priority) == (TaskStatus.PENDING, 0, 2, Priority.HIGH)
    assert task.timeout_s == settings.SCHEDULER.default_task_timeout_s
    assert task.tenant.slug == "acme" and task.submitter == alice
    event = TaskEvent.objects.get(task=task)
    assert (event.from_status, event.to_status, event.actor) == ("", "pending", "user:alice")
    assert r.json()["priority"] == "HIGH" and r.json()["tenant"] == "acme"


def test_an_argv_list_command_is_joined_with_shell_quoting(as_alice):
    r = as_alice.post("/api/v1/tasks", {"command": ["python", "-c", "print('hi there')"]}, format="json")
    assert r.status_code == 201
    assert Task.objects.get(pk=r.json()["id"]).command == "python -c 'print('\"'\"'hi there'\"'\"')'"


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"gpu_count": 9}, "gpu_count", "between 1 and 8"),
    ({"gpu_count": 0}, "gpu_count", "between 1 and 8"),
    ({"gpu_count": "two"}, "gpu_count", "whole number"),
    ({"gpu_memory_mb": 80_000}, "gpu_memory_mb", "between 1 and 79559"),
    ({"timeout_s": 86_401}, "timeout_s", "1 to 86400"),
    ({"priority": "CRITICAL"}, "priority", "at most HIGH"),
    ({"priority": "urgent"}, "priority", "LOW, NORMAL, HIGH, CRITICAL"),
    ({"workload_class": "interactive"}, "workload_class", "online, batch"),
    ({"workload_class": ["batch"]}, "workload_class", "online, batch"),
    ({"share_mode": {"shared": True}}, "share_mode", "exclusive, shared"),
    ({"command": "x" * 8193}, "command", "At most 8192"),
    ({"command": ""}, "command", "Required"),
    ({"env": {"A": "x" * 20_000}}, "env", "16384 bytes"),
    ({"env": {"1BAD": "x"}}, "env", "Invalid variable name"),
    ({"env": {f"V{i}": "x" for i in range(65)}}, "env", "At most 64"),
    ({"gpus": 2}, "gpus", "Unknown field"),
    ({"tenant": "globex"}, "tenant", "Unknown tenant"),
    ({"share_mode": "shared"}, "share_mode", "gpu_memory_mb"),
])
def test_a_bad_submission_gets_a_field_message_and_creates_nothing(as_alice, fields, field, words):
    r = submit(as_alice, **fields)
    assert r.status_code == 400
    assert words in " ".join(r.json()[field]), r.json()
    assert not Task.objects.exists()


def test_a_workload_class_outside_the_quota_is_refused(as_alice, acme):
    Quota.objects.filter(tenant=acme).update(allowed_classes=["batch"])
    r = submit(as_alice, workload_class="online")
    assert r.status_code == 400
    assert r.json()["workload_class"] == ["Tenant acme may not submit online tasks (allowed: batch)."]


def test_the_tenant_must_be_named_by_users_of_several_tenants(api_client_for, alice, globex, servers):
    from tenants.models import Membership

    Membership.objects.create(user=alice, tenant=globex)
    client = api_client_for(alice)
    assert "Required: you belong to acme, globex" in submit(client).json()["tenant"][0]
    assert submit(client, tenant="globex").status_code == 201


def test_the_pending_task_limit_is_enforced(as_alice, acme):
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=2)
    assert submit(as_alice).status_code == 201
    assert submit(as_alice).status_code == 201
    r = submit(as_alice)
    assert r.status_code == 400 and "more than 2 pending tasks" in r.json()["tenant"][0]
    assert Task.objects.count() == 2


def test_no_task_can_be_submitted_before_any_gpu_server_exists(api_client_for, alice):
    r = submit(api_client_for(alice))
    assert r.status_code == 400 and "No GPU server" in r.json()["gpu_count"][0]


def test_a_batch_creates_all_tasks_with_their_events(as_alice):
    r = as_alice.post("/api/v1/tasks/batch", {"tasks": [{"command": f"echo {i}", "name": f"t{i}"}
                                                        for i in range(5)]}, format="json")
    assert r.status_code == 201, r.content
    assert r.json()["count"] == 5
    assert sorted(Task.objects.values_list("name", flat=True)) == [f"t{i}" for i in range(5)]
    assert TaskEvent.objects.filter(task_id__in=r.json()["ids"], to_status="pending").count() == 5


def test_a_batch_with_one_bad_task_creates_nothing_and_says_which(as_alice):
    r = as_alice.post("/api/v1/tasks/batch", {"tasks": [{"command": "echo ok"}, {"command": "echo", "gpu_count": 99}]},
                      format="json")
    assert r.status_code == 400
    errors = r.json()["tasks"]
    assert errors[0] == {} and "gpu_count" in errors[1]
    assert not Task.objects.exists()


def test_a_batch_over_the_limit_or_empty_is_refused(as_alice):
    big = as_alice.post("/api/v1/tasks/batch", {"tasks": [{"command": "echo"}] * 1001}, format="json")
    assert big.status_code == 400 and "At most 1000" in big.json()["tasks"][0]
    assert as_alice.post("/api/v1/tasks/batch", {"tasks": []}, format="json").status_code == 400
    assert as_alice.post("/api/v1/tasks/batch", {"tasks": [], "x": 1}, format="json").json()["x"]


def test_a_batch_cannot_overrun_the_pending_limit(as_alice, acme):
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=3)
    r = as_alice.post("/api/v1/tasks/batch", {"tasks": [{"command": "echo"}] * 4}, format="json")
    assert r.status_code == 400 and "tenant" in r.json()
    assert not Task.objects.exists()


def test_the_list_filters_by_status_tenant_and_priority_and_paginates(as_alice, acme, alice):
    for i in range(6):
        Task.objects.create(tenant=acme, submitter=alice, name=f"t{i}", command="x",
                            priority=Priority.HIGH if i % 2 else Priority.LOW,
                            status=TaskStatus.RUNNING if i < 2 else TaskStatus.PENDING)
    page = as_alice.get("/api/v1/tasks?limit=4").json()
    assert page["count"] == 6 and len(page["results"]) == 4 and page["next"]
    assert [t["name"] for t in page["results"]] == ["t5", "t4", "t3", "t2"]
    running = as_alice.get("/api/v1/tasks?status=running").json()
    assert sorted(t["name"] for t in running["results"]) == ["t0", "t1"]
    high_pending = as_alice.get("/api/v1/tasks?status=pending&priority=high&tenant=acme").json()
    assert sorted(t["name"] for t in high_pending["results"]) == ["t3", "t5"]
    queue = as_alice.get("/api/v1/tasks?ordering=queue").json()["results"]
    assert [t["status"] for t in queue][:2] == ["running", "running"]


def test_a_bad_list_filter_is_a_400_with_the_field(as_alice):
    assert "status" in as_alice.get("/api/v1/tasks?status=sleeping").json()
    assert "priority" in as_alice.get("/api/v1/tasks?priority=urgent").json()
    assert as_alice.get("/api/v1/tasks?ordering=name").status_code == 400


def test_the_detail_shows_pending_reason_and_queue_position(as_alice, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="wait", command="x",
                               pending_reason="tenant acme at its GPU quota (8/8)", queue_position=3)
    body = as_alice.get(f"/api/v1/tasks/{task.pk}").json()
    assert (body["pending_reason"], body["queue_position"], body["gpus"]) == (
        "tenant acme at its GPU quota (8/8)", 3, [])


def test_a_member_cancels_their_own_task_with_an_event(as_bob, acme, bob):
    task = Task.objects.create(tenant=acme, submitter=bob, name="t", command="x")
    r = as_bob.post(f"/api/v1/tasks/{task.pk}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert task.events.get().actor == "user:bob"


def test_a_member_cannot_cancel_a_colleagues_task_but_the_tenant_admin_can(as_bob, as_alice, acme, alice, bob):
    alices = Task.objects.create(tenant=acme, submitter=alice, name="a", command="x")
    bobs = Task.objects.create(tenant=acme, submitter=bob, name="b", command="x")
    assert as_bob.post(f"/api/v1/tasks/{alices.pk}/cancel").status_code == 403
    assert Task.objects.get(pk=alices.pk).status == TaskStatus.PENDING
    assert as_alice.post(f"/api/v1/tasks/{bobs.pk}/cancel").status_code == 200
    assert Task.objects.get(pk=bobs.pk).status == TaskStatus.CANCELLED


def test_staff_see_and_cancel_any_task(api_client_for, staff, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="a", command="x")
    client = api_client_for(staff)
    assert client.get("/api/v1/tasks").json()["count"] == 1
    assert client.post(f"/api/v1/tasks/{task.pk}/cancel").status_code == 200


def test_cancelling_an_ended_task_is_a_conflict(as_alice, acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="a", command="x", status=TaskStatus.SUCCEEDED)
    r = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel")
    assert r.status_code == 409 and "already ended" in r.json()["detail"]


def test_the_events_list_the_tasks_history(as_alice):
    task_id = submit(as_alice).json()["id"]
    as_alice.post(f"/api/v1/tasks/{task_id}/cancel")
    events = as_alice.get(f"/api/v1/tasks/{task_id}/events").json()
    assert [(e["from_status"], e["to_status"]) for e in events] == [("", "pending"), ("pending", "cancelled")]


@pytest.fixture
def logged(acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="log", command="x", status=TaskStatus.RUNNING)
    offset = 0
    for i in range(5):
        data = f"line {i}\n"
        TaskLogChunk.objects.create(task=task, attempt=0, offset=offset, data=data)
        offset += len(data.encode())
    return task


def test_logs_read_from_an_offset_and_say_where_to_continue(as_alice, logged):
    whole = as_alice.get(f"/api/v1/tasks/{logged.pk}/logs").json()
    assert whole["data"] == "".join(f"line {i}\n" for i in range(5))
    assert whole["next_offset"] == 35 and whole["final"] is False
    rest = as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?offset=10").json()
    assert rest["data"] == "e 1\n" + "".join(f"line {i}\n" for i in range(2, 5))
    assert as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?offset=35").json()["data"] == ""


def test_logs_tail_gives_the_last_lines(as_alice, logged):
    tail = as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?tail=2").json()
    assert tail["data"] == "line 3\nline 4\n"
    assert (tail["offset"], tail["next_offset"]) == (21, 35)


def test_bad_log_parameters_are_a_400(as_alice, logged):
    assert "tail" in as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?tail=0").json()
    assert "offset" in as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?offset=-1").json()
    assert "tail" in as_alice.get(f"/api/v1/tasks/{logged.pk}/logs?tail=3&offset=2").json()


def test_the_task_representation_has_exactly_the_declared_fields(as_alice):
    from portal.api.scheduling.serializers import TaskDetailSerializer, TaskSerializer

    task = Task.objects.get(pk=submit(as_alice).json()["id"])
    assert set(TaskSerializer(task).data) == set(TaskSerializer().fields)
    assert set(TaskDetailSerializer(task).data) == set(TaskDetailSerializer().fields)


def test_the_preview_says_where_it_would_start_and_creates_nothing(as_alice):
    r = as_alice.post("/api/v1/tasks/preview", {"command": "x", "gpu_count": 4}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["fits"] is True, body
    assert body["server"] in ("gpu-01", "gpu-02") and len(body["gpus"]) == 4
    assert not Task.objects.exists()


def test_the_preview_says_why_not_and_validates_like_a_submit(as_alice, acme):
    Quota.objects.filter(tenant=acme).update(max_gpus=1)
    body = as_alice.post("/api/v1/tasks/preview", {"command": "x", "gpu_count": 2}, format="json").json()
    assert body["fits"] is False and "quota" in body["message"].lower()
    assert "gpu_count" in as_alice.post("/api/v1/tasks/preview", {"command": "x", "gpu_count": 99},
                                        format="json").json()


def test_the_preview_says_a_request_no_idle_gpu_can_hold_can_never_fit(as_alice, servers):
    # Idle GPUs report some memory in use (the driver's), as real and simulated ones do.
    GPU.objects.update(memory_used_mb=512)
    largest = 81_559 - 2_000  # the most the API accepts: the largest GPU minus the safety margin
    body = as_alice.post("/api/v1/tasks/preview", {"command": "x", "gpu_memory_mb": largest},
                         format="json").json()
    assert body["fits"] is False
    assert body["message"].startswith("Can never fit on this cluster: no active server has 1 GPU with"), body
    assert "idle GPUs already use up to 512 MB" in body["message"]
    smaller = as_alice.post("/api/v1/tasks/preview", {"command": "x", "gpu_memory_mb": largest - 512},
                            format="json").json()
    assert smaller["fits"] is True, smaller
