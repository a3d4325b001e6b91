"""The operators' admin: every page renders for staff and is refused to others."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse

from kernel.models import Alert, ControlPlaneServer
from scheduling.models import Allocation, Task, TaskEvent, TaskLogChunk


@pytest.fixture
def populated(acme, alice, servers):
    gpu = servers[0].gpus.first()
    task = Task.objects.create(tenant=acme, submitter=alice, name="train", command="python train.py",
                               status="assigned", node=servers[0])
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=40_000)
    TaskEvent.objects.create(task=task, from_status="pending", to_status="assigned", actor="scheduler")
    TaskLogChunk.objects.create(task=task, offset=0, data="epoch 1 <loss=0.5>\n")
    ControlPlaneServer.objects.create(name="host:1:web", role="web", hostname="host", pid=1)
    Alert.objects.create(kind="server_lost", message="gpu-02 lost", node=servers[1])
    return task


def _admin_urls(populated):
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        yield reverse(f"admin:{info[0]}_{info[1]}_changelist")
        obj = model._default_manager.order_by("pk").first()
        if obj is not None:
            yield reverse(f"admin:{info[0]}_{info[1]}_change", args=[obj.pk])


def test_every_admin_changelist_and_change_page_renders_for_staff(client, staff, populated):
    client.force_login(staff)
    urls = list(_admin_urls(populated))
    assert len(urls) > 20
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url


def test_admin_pages_are_refused_to_a_non_staff_user(client, alice, populated):
    client.force_login(alice)
    for url in _admin_urls(populated):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response.url.startswith(reverse("admin:login")), url


def test_the_task_page_shows_its_log_escaped_and_its_events(client, staff, populated):
    client.force_login(staff)
    page = client.get(reverse("admin:scheduling_task_change", args=[populated.pk])).content.decode()
    assert "epoch 1 &lt;loss=0.5&gt;" in page
    assert "scheduler" in page


def test_the_task_list_filters_by_status_tenant_priority_class_and_node(client, staff, populated, servers):
    client.force_login(staff)
    url = reverse("admin:scheduling_task_changelist")
    for query in ("status__exact=assigned", f"tenant__id__exact={populated.tenant_id}", "priority__exact=1",
                  "workload_class__exact=batch", f"node__id__exact={servers[0].pk}", "q=train"):
        response = client.get(f"{url}?{query}")
        assert response.status_code == 200, query
        assert response.context["cl"].result_count == 1, query
    assert client.get(f"{url}?status__exact=pending").context["cl"].result_count == 0


def test_task_events_cannot_be_edited_or_deleted(client, staff, populated):
    client.force_login(staff)
    event = populated.events.first()
    assert client.post(reverse("admin:scheduling_taskevent_change", args=[event.pk]), {}).status_code == 403
    assert client.post(reverse("admin:scheduling_taskevent_delete", args=[event.pk]), {"post": "yes"}).status_code \
        == 403
    assert TaskEvent.objects.filter(pk=event.pk).exists()


def test_the_tenant_list_shows_usage_beside_each_limit(client, staff, populated):
    client.force_login(staff)
    page = client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert "1 / 8" in page  # GPUs used / max
    assert "40000 MB / 640000 MB" in page


def test_the_admin_calls_servers_gpu_servers_like_the_readme_and_the_portal(client, staff, populated):
    client.force_login(staff)
    index = client.get(reverse("admin:index")).content.decode()
    assert "GPU servers" in index and ">Nodes<" not in index
    tasks = client.get(reverse("admin:scheduling_task_changelist")).content.decode()
    assert "By server" in tasks and "By node" not in tasks
