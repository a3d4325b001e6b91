"""In-app alerts: rows in the admin, a live push, and a webhook POSTed after commit."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import transaction

from kernel import live
from kernel.alerts import raise_alert
from kernel.models import Alert
from scheduling import lifecycle
from scheduling.models import Allocation, Task
from tests.conftest import wait_for


@pytest.fixture
def webhook(settings):
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield received
    server.shutdown()
    server.server_close()


def test_an_alert_is_stored_pushed_and_posted_to_the_webhook_after_commit(servers, webhook, monkeypatch,
                                                                         django_capture_on_commit_callbacks):
    pushed: list = []
    monkeypatch.setattr(live, "_send_all", pushed.extend)
    with django_capture_on_commit_callbacks(execute=True):
        alert = raise_alert("server_lost", "gpu-01 missed 3 heartbeats", node=servers[0])
        assert webhook == [] and pushed == []  # nothing leaves before commit
    wait_for(lambda: len(webhook) == 1)
    assert webhook[0]["alert"]["kind"] == "server_lost" and webhook[0]["alert"]["node_id"] == servers[0].pk
    assert webhook[0]["alert"]["severity"] == "critical"
    assert pushed == [("cluster", {"type": "alert.raised", "alert": webhook[0]["alert"]})]
    assert Alert.objects.get() == alert


def test_a_rolled_back_alert_is_neither_stored_nor_posted(servers, webhook, django_capture_on_commit_callbacks):
    with (django_capture_on_commit_callbacks(execute=True) as callbacks, pytest.raises(RuntimeError),
          transaction.atomic()):
        raise_alert("gpu_error", "xid 79", gpu=servers[0].gpus.first())
        raise RuntimeError("rolled back")
    assert callbacks == []
    assert not Alert.objects.exists()
    assert webhook == []


def test_an_open_alert_for_the_same_thing_is_not_raised_twice(servers, django_capture_on_commit_callbacks):
    first = raise_alert("server_lost", "lost", node=servers[0].pk)
    again = raise_alert("server_lost", "still lost", node=servers[0])
    other = raise_alert("server_lost", "lost", node=servers[1])
    assert again == first and other != first
    Alert.objects.filter(pk=first.pk).update(acknowledged_at="2026-01-01T00:00:00Z")
    assert raise_alert("server_lost", "lost again", node=servers[0]) != first


def test_an_unknown_alert_kind_is_refused(db):
    with pytest.raises(ValueError, match="unknown alert kind 'disk_full'"):
        raise_alert("disk_full", "no")


def test_a_task_out_of_memory_raises_an_alert_naming_the_task(acme, servers, webhook,
                                                               django_capture_on_commit_callbacks):
    gpu = servers[0].gpus.first()
    task = Task.objects.create(tenant=acme, name="llm", command="x", status="running", node=servers[0],
                               model_name="deepseek-7b", gpu_memory_mb=20_000, max_retries=2)
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=20_000)
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.report_finished(task.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    alert = Alert.objects.get(kind="task_oom")
    assert alert.task_id == task.pk and alert.node_id == servers[0].pk
    assert "deepseek-7b now needs 24000 MB" in alert.message and "requeued" in alert.message
    wait_for(lambda: len(webhook) == 1)
    assert webhook[0]["alert"]["task_id"] == task.pk


def test_a_dead_webhook_does_not_break_the_caller(servers, settings, django_capture_on_commit_callbacks):
    settings.ALERT_WEBHOOK_URL = "http://127.0.0.1:9/nothing-listens-here"
    with django_capture_on_commit_callbacks(execute=True):
        raise_alert("gpu_error", "xid 48", gpu=servers[0].gpus.first())
    assert Alert.objects.filter(kind="gpu_error").count() == 1


def test_a_long_queue_wait_raises_one_alert_until_acknowledged(acme, settings):
    from datetime import timedelta

    from django.utils import timezone

    from scheduling.queue_wait import check_queue_wait
    from scheduling.sweep import sweep_task

    settings.ALERT_QUEUE_WAIT_S = 600
    Task.objects.create(tenant=acme, name="fresh", command="x")
    assert check_queue_wait() is None
    old = Task.objects.create(tenant=acme, name="stuck", command="x", created_at=timezone.now() - timedelta(hours=1))
    sweep_task()
    alert = Alert.objects.get(kind="queue_wait")
    assert f"#{old.pk} stuck has waited 60 min" in alert.message and "2 task(s) pending" in alert.message
    assert check_queue_wait() == alert  # still open: not raised again
    settings.ALERT_QUEUE_WAIT_S = 0
    Alert.objects.update(acknowledged_at=timezone.now())
    assert check_queue_wait() is None


def test_the_final_oom_of_a_task_alerts_even_while_the_first_is_open(acme, servers):
    gpu = servers[0].gpus.first()
    task = Task.objects.create(tenant=acme, name="llm", command="x", status="running", node=servers[0],
                               model_name="deepseek-7b", gpu_memory_mb=20_000, max_retries=1)
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=20_000)
    lifecycle.report_finished(task.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    Task.objects.filter(pk=task.pk).update(status="running", node=servers[0])
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=24_000)
    lifecycle.report_finished(task.pk, node_id=servers[0].pk, exit_code=1, oom=True, actor="agent:gpu-01")
    messages = list(Alert.objects.filter(kind="task_oom", acknowledged_at__isnull=True)
                    .order_by("pk").values_list("message", flat=True))
    assert len(messages) == 2 and "requeued" in messages[0] and "failed: no retries left" in messages[1]


def test_the_queue_wait_alert_ignores_tasks_held_by_their_own_quota_and_counts_from_the_requeue(acme, settings):
    from datetime import timedelta

    from django.utils import timezone

    from scheduling.models import TaskEvent
    from scheduling.queue_wait import check_queue_wait

    settings.ALERT_QUEUE_WAIT_S = 600
    hour_ago = timezone.now() - timedelta(hours=1)
    # Acme's quota (8 GPUs) can never hold this one: acme's business, not the operator's.
    Task.objects.create(tenant=acme, name="too-wide", command="x", gpu_count=9, created_at=hour_ago)
    # Submitted an hour ago but requeued a minute ago: it has waited one minute.
    requeued = Task.objects.create(tenant=acme, name="requeued", command="x", created_at=hour_ago, attempt=1)
    TaskEvent.objects.create(task=requeued, from_status="running", to_status="pending", actor="sweep",
                             created_at=timezone.now() - timedelta(minutes=1))
    assert check_queue_wait() is None
    TaskEvent.objects.filter(task=requeued).update(created_at=timezone.now() - timedelta(minutes=20))
    alert = check_queue_wait()
    assert alert is not None and f"#{requeued.pk} requeued has waited 20 min" in alert.message
