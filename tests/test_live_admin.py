"""The admin as a live console: live cells, the cluster overview, audited actions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from kernel import live
from kernel.models import Alert
from nodes.models import GPU, Node
from scheduling.models import Allocation, Task, TaskEvent


@pytest.fixture
def pushed(monkeypatch):
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(live, "_send_all", sent.extend)
    return sent


@pytest.fixture
def running(acme, alice, servers):
    gpu = servers[0].gpus.get(index=1)
    task = Task.objects.create(tenant=acme, submitter=alice, name="train", command="x", status="running",
                               node=servers[0])
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=40_000)
    GPU.objects.filter(pk=gpu.pk).update(memory_used_mb=40_000, utilization_pct=93, temperature_c=70)
    return task


def _act(client, model: str, action: str, ids: list[int], **extra):
    url = reverse(f"admin:{model}_changelist")
    return client.post(url, {"action": action, "_selected_action": ids, **extra}, follow=True)


def test_the_gpu_list_draws_live_cells_for_each_gpu(client, staff, running):
    client.force_login(staff)
    page = client.get(reverse("admin:nodes_gpu_changelist")).content.decode()
    gpu = running.allocations.get().gpu
    assert f'data-gpu="{gpu.pk}" data-field="utilization_pct"' in page
    assert f'data-gpu="{gpu.pk}" data-field="memory"' in page and "width:49%" in page
    assert f'>#{running.pk} train<' in page and ">acme<" in page
    assert "state-allocated" in page and "portal/live.js" in page


def test_the_cluster_overview_is_linked_from_the_index_and_draws_every_gpu(client, staff, running, servers):
    client.force_login(staff)
    index = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin-cluster") in index
    page = client.get(reverse("admin-cluster")).content.decode()
    assert page.count('class="gpu-cell') == 16
    assert "2 servers (2 active), 16 GPUs: 1 allocated, 15 free" in page
    assert 'id="cluster-grid"' in page


def test_the_cluster_overview_is_refused_to_non_staff(client, alice):
    client.force_login(alice)
    response = client.get(reverse("admin-cluster"))
    assert response.status_code == 302 and response.url.startswith(reverse("admin:login"))


def test_draining_a_server_is_audited_and_pushed_after_commit(client, staff, servers, pushed,
                                                              django_capture_on_commit_callbacks):
    client.force_login(staff)
    with django_capture_on_commit_callbacks(execute=True):
        response = _act(client, "nodes_node", "drain", [servers[0].pk])
    assert "1 server(s) drained." in response.content.decode()
    node = Node.objects.get(pk=servers[0].pk)
    assert node.status == "draining" and node.status_reason == "drained by operator"
    entry = LogEntry.objects.get(object_id=str(node.pk))
    assert entry.user == staff and "active -> draining" in entry.get_change_message()
    assert ("cluster", {"type": "gpus.changed", "node_ids": [node.pk]}) in pushed


def test_maintenance_and_resume_are_audited_too(client, staff, servers):
    client.force_login(staff)
    _act(client, "nodes_node", "maintenance", [servers[1].pk])
    _act(client, "nodes_node", "resume", [servers[1].pk])
    messages = [e.get_change_message() for e in LogEntry.objects.order_by("pk")]
    assert messages == ["put in maintenance: status active -> maintenance", "resumed: status maintenance -> active"]


def test_cordoning_a_gpu_is_audited_raises_an_alert_and_uncordon_undoes_it(client, staff, servers, pushed,
                                                                           django_capture_on_commit_callbacks):
    client.force_login(staff)
    gpu = servers[0].gpus.get(index=4)
    with django_capture_on_commit_callbacks(execute=True):
        _act(client, "nodes_gpu", "cordon", [gpu.pk])
    gpu.refresh_from_db()
    assert gpu.cordoned and gpu.cordon_reason == "cordoned by operator"
    alert = Alert.objects.get(gpu=gpu)
    assert alert.kind == "gpu_error" and alert.severity == "info"
    assert ("cluster", {"type": "gpus.changed", "node_ids": [servers[0].pk]}) in pushed
    _act(client, "nodes_gpu", "uncordon", [gpu.pk])
    gpu.refresh_from_db()
    assert not gpu.cordoned
    assert [e.get_change_message() for e in LogEntry.objects.order_by("pk")] == [
        "cordoned by operator", "uncordoned by operator"]


def test_cancelling_a_task_from_the_admin_is_a_task_event_by_the_operator(client, staff, running, pushed,
                                                                          django_capture_on_commit_callbacks):
    client.force_login(staff)
    with django_capture_on_commit_callbacks(execute=True):
        _act(client, "scheduling_task", "cancel_tasks", [running.pk])
    running.refresh_from_db()
    assert running.status == "cancelled" and not running.allocations.filter(released_at__isnull=True).exists()
    event = running.events.get()
    assert event.actor == "admin:operator" and event.to_status == "cancelled"
    assert (f"node-{running.node_id}", {"type": "assignments.changed", "node_id": running.node_id}) in pushed


def test_requeueing_a_running_task_returns_it_to_the_queue_even_with_no_retries_left(client, staff, running):
    Task.objects.filter(pk=running.pk).update(max_retries=0)
    client.force_login(staff)
    response = _act(client, "scheduling_task", "requeue_tasks", [running.pk])
    assert "1 task(s) requeued." in response.content.decode()
    running.refresh_from_db()
    assert running.status == "pending" and running.node is None and running.attempt == 1
    assert running.events.get().actor == "admin:operator"


def test_requeue_leaves_finished_tasks_alone_and_says_so(client, staff, acme):
    done = Task.objects.create(tenant=acme, name="done", command="x", status="succeeded")
    client.force_login(staff)
    response = _act(client, "scheduling_task", "requeue_tasks", [done.pk])
    assert "0 task(s) requeued (1 not assigned or running, left as they were)." in response.content.decode()
    assert Task.objects.get(pk=done.pk).status == "succeeded"


def test_changing_priority_writes_an_event_and_needs_a_chosen_priority(client, staff, acme):
    task = Task.objects.create(tenant=acme, name="p", command="x", priority=1)
    client.force_login(staff)
    response = _act(client, "scheduling_task", "change_priority", [task.pk])
    assert "Choose a priority" in response.content.decode()
    assert Task.objects.get(pk=task.pk).priority == 1
    response = _act(client, "scheduling_task", "change_priority", [task.pk], priority="3")
    assert "1 task(s) now CRITICAL." in response.content.decode()
    event = TaskEvent.objects.get(task=task)
    assert (event.from_status, event.to_status, event.actor, event.reason) == (
        "pending", "pending", "admin:operator", "priority NORMAL -> CRITICAL")
    assert Task.objects.get(pk=task.pk).priority == 3


def test_the_tenant_pages_show_live_usage_beside_limits(client, staff, running, acme):
    client.force_login(staff)
    listing = client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert f'<span data-tenant="{acme.pk}" data-usage="gpus" data-unit="" data-suffix=" / 8">1 / 8</span>' in listing
    page = client.get(reverse("admin:tenants_tenant_change", args=[acme.pk])).content.decode()
    assert f'<span data-tenant="{acme.pk}" data-usage="running_tasks">1</span> of 8' in page


def test_a_gpu_reserved_in_the_config_shows_as_reserved_on_the_live_grid(servers, settings):
    import dataclasses

    from portal import livedata

    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, reserved_gpus=("gpu-01:3",))
    states = {(row["node"], row["index"]): row["state"] for row in livedata.gpu_rows()}
    assert states[("gpu-01", 3)] == "reserved"
    assert states[("gpu-01", 2)] == "free"


def test_tenant_colours_on_the_cluster_grid_never_look_like_a_state():
    from portal.livedata import STATE_HUES, TENANT_HUES, tenant_hue

    for hue in TENANT_HUES:
        # At least 45 degrees of hue from free (green), cordoned (amber) and error (red).
        assert all(min(abs(hue - s), 360 - abs(hue - s)) >= 45 for s in STATE_HUES.values()), hue
    assert len({tenant_hue(t) for t in range(1, 11)}) == 10  # ten tenants, ten colours


def test_server_rows_count_the_gpus_holding_open_allocations_not_their_history(running, acme, servers):
    from portal import livedata

    now = timezone.now()
    done = Task.objects.create(tenant=acme, name="done", command="x", status="succeeded", node=servers[0])
    for index in (1, 2):  # the running task's GPU and a free one, each held an hour ago
        Allocation.objects.create(task=done, gpu=servers[0].gpus.get(index=index), node=servers[0], memory_mb=1000,
                                  allocated_at=now - timedelta(hours=2), released_at=now - timedelta(hours=1))
    rows = {row["name"]: row for row in livedata.node_rows()}
    assert (rows["gpu-01"]["gpus"], rows["gpu-01"]["gpus_busy"]) == (8, 1)
    assert (rows["gpu-02"]["gpus"], rows["gpu-02"]["gpus_busy"]) == (8, 0)


def test_task_events_list_newest_first_and_filter_by_kind_of_actor(client, staff, acme):
    task = Task.objects.create(tenant=acme, name="evented", command="x")
    for actor in ("user:alice", "scheduler", "agent:gpu-01", "scheduler:q", "admin:root", "username-lookalike"):
        TaskEvent.objects.create(task=task, from_status="pending", to_status="assigned", actor=actor,
                                 reason=f"by {actor}")
    client.force_login(staff)
    url = reverse("admin:scheduling_taskevent_changelist")
    page = client.get(url).content.decode()
    order = [page.index(f"by {a}") for a in ("username-lookalike", "admin:root", "scheduler:q", "user:alice")]
    assert order == sorted(order)  # the newest first
    scheduler = client.get(url, {"actor_kind": "scheduler"}).content.decode()
    assert "by scheduler<" in scheduler and "by scheduler:q" in scheduler and "by user:alice" not in scheduler
    users = client.get(url, {"actor_kind": "user"}).content.decode()
    assert "by user:alice" in users and "username-lookalike" not in users and "by scheduler" not in users
    assert client.get(url, {"actor_kind": "nonsense"}).status_code == 200


def test_history_lists_count_no_further_than_the_page_asked_for(client, staff, acme, monkeypatch):
    """The task events and allocations lists (portal.admin.scheduling.BoundedCountMixin): the
    count stops at the cap or one row past the page asked for, the page says "more than N", and
    every page stays reachable; the whole table is not counted a second time."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from portal.admin.scheduling import TaskEventAdmin

    monkeypatch.setattr(TaskEventAdmin, "list_per_page", 10)
    monkeypatch.setattr(TaskEventAdmin, "list_count_cap", 20)
    task = Task.objects.create(tenant=acme, name="evented", command="x")
    TaskEvent.objects.bulk_create(TaskEvent(task=task, from_status="pending", to_status="assigned",
                                            actor="scheduler", reason=f"event {i:02d};") for i in range(45))
    client.force_login(staff)
    url = reverse("admin:scheduling_taskevent_changelist")

    with CaptureQueriesContext(connection) as queries:
        first = client.get(url).content.decode()
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"] and "taskevent" in q["sql"]]
    assert len(counts) == 1 and "LIMIT 21" in counts[0]
    assert "more than 20 task events" in first
    assert "event 44;" in first and "event 34;" not in first  # newest first, ten a page
    assert "?p=3" in first  # the page past the counted ones is linked

    third = client.get(url, {"p": 3}).content.decode()
    assert "more than 30 task events" in third and "event 24;" in third and "event 15;" in third
    assert "event 25;" not in third and "event 14;" not in third
    last = client.get(url, {"p": 5}).content.decode()
    assert "45 task events" in last and "more than" not in last and "event 00;" in last
    assert client.get(url, {"p": 99}).status_code in (200, 302)  # the admin's own "no such page"
    assert client.get(url, {"p": "x" * 40}).status_code in (200, 302)

    searched = client.get(url, {"q": "event"}).content.decode()
    assert "more than 20 results" in searched
    chinese = client.get(url, HTTP_ACCEPT_LANGUAGE="zh-CN,zh;q=0.9").content.decode()
    assert "超过 20 个" in chinese

    # A list short of the cap is counted exactly, as Django's admin counts it.
    assert "0 allocations" in client.get(reverse("admin:scheduling_allocation_changelist")).content.decode()


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_the_task_lists_date_links_are_djangos_found_without_reading_every_task(client, staff, acme, settings,
                                                                                 zone):
    """portal/templatetags/admin_dates.py: the same year, month and day links as Django's own
    DISTINCT over every task, in the site's time zone, including a year and a month with no task
    between others and a task on the last second of a month; no statement truncates every task's
    date."""
    import re
    from datetime import UTC, datetime
    from html import unescape
    from urllib.parse import parse_qsl

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.TIME_ZONE = zone
    moments = [datetime(2023, 5, 10, 12, tzinfo=UTC), datetime(2023, 5, 20, 3, tzinfo=UTC),
               datetime(2023, 11, 2, 4, 30, tzinfo=UTC), datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC),
               datetime(2025, 2, 1, 0, 0, tzinfo=UTC), datetime(2025, 3, 1, 4, 59, 59, tzinfo=UTC)]
    for i, moment in enumerate(moments):
        task = Task.objects.create(tenant=acme, name=f"dated {i}", command="x")
        Task.objects.filter(pk=task.pk).update(created_at=moment)
    client.force_login(staff)
    url = reverse("admin:scheduling_task_changelist")

    def links(params: dict) -> set[str]:
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url, params).content.decode()
        assert not [q for q in queries.captured_queries if "DATE_TRUNC" in q["sql"].upper()]
        start = page.index('<nav class="toplinks">')
        hierarchy = page[start:page.index("</nav>", start)]
        # Each period's link, not the one back up a level.
        return {frozenset(parse_qsl(unescape(query))) for query in re.findall(r'<a href="\?([^"]*)">', hierarchy)}

    def period(**lookup) -> frozenset:
        return frozenset((f"created_at__{k}", str(v)) for k, v in lookup.items())

    def django(kind: str, **lookup) -> list:
        return list(Task.objects.filter(**{f"created_at__{k}": v for k, v in lookup.items()})
                    .datetimes("created_at", kind))

    years = django("year")
    assert 2024 not in [y.year for y in years]
    assert links({}) == {period(year=y.year) for y in years}
    for year in years:
        months = django("month", year=year.year)
        assert links({"created_at__year": year.year}) == {period(year=year.year, month=m.month) for m in months}
        for month in months:
            days = django("day", year=year.year, month=month.month)
            assert links({"created_at__year": year.year, "created_at__month": month.month}) == {
                period(year=year.year, month=month.month, day=d.day) for d in days}
