"""Quota editing in the admin: clear form errors, and a warning (not a kill) below usage."""

from __future__ import annotations

from django.urls import reverse

from scheduling.models import Allocation, Task
from tenants.models import Quota


def _form(tenant, **quota):
    data = {
        "name": tenant.name, "slug": tenant.slug, "description": "",
        "quota-TOTAL_FORMS": "1", "quota-INITIAL_FORMS": "1", "quota-MIN_NUM_FORMS": "1", "quota-MAX_NUM_FORMS": "1",
        "quota-0-id": str(tenant.quota.pk), "quota-0-tenant": str(tenant.pk),
        "quota-0-max_gpus": "8", "quota-0-max_gpu_memory_mb": "640000", "quota-0-max_running_tasks": "8",
        "quota-0-max_pending_tasks": "100", "quota-0-max_priority": "2", "quota-0-allowed_classes": "online,batch",
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0", "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }
    data.update({f"quota-0-{k}": v for k, v in quota.items()})
    return data


def _post(client, tenant, **quota):
    return client.post(reverse("admin:tenants_tenant_change", args=[tenant.pk]), _form(tenant, **quota), follow=True)


def test_a_valid_quota_is_saved(client, staff, acme):
    client.force_login(staff)
    response = _post(client, acme, max_gpus="16", allowed_classes="batch")
    assert response.status_code == 200
    quota = Quota.objects.get(tenant=acme)
    assert (quota.max_gpus, quota.allowed_classes) == (16, ["batch"])


def test_negative_limits_get_a_form_error_and_change_nothing(client, staff, acme):
    client.force_login(staff)
    response = _post(client, acme, max_gpus="-1", max_running_tasks="-5")
    errors = response.context["inline_admin_formsets"][0].formset.errors[0]
    assert "max_gpus" in errors and "max_running_tasks" in errors
    assert "greater than or equal to 0" in str(errors["max_gpus"])
    assert Quota.objects.get(tenant=acme).max_gpus == 8


def test_an_unknown_workload_class_gets_a_form_error(client, staff, acme):
    client.force_login(staff)
    response = _post(client, acme, allowed_classes="batch,realtime")
    errors = response.context["inline_admin_formsets"][0].formset.errors[0]
    assert errors["allowed_classes"] == ["Unknown workload class realtime: use online and/or batch."]
    assert Quota.objects.get(tenant=acme).allowed_classes == ["online", "batch"]


def test_a_limit_below_current_usage_is_saved_with_a_warning_and_kills_nothing(client, staff, acme, servers):
    for i, gpu in enumerate(servers[0].gpus.all()[:3]):
        task = Task.objects.create(tenant=acme, name=f"t{i}", command="true", status="running", node=servers[0])
        Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=10_000)
    client.force_login(staff)
    response = _post(client, acme, max_gpus="2")
    assert Quota.objects.get(tenant=acme).max_gpus == 2
    warnings = [str(m) for m in response.context["messages"]]
    assert any("saved below current usage (GPUs 3 > 2)" in m for m in warnings), warnings
    assert Task.objects.filter(tenant=acme, status="running").count() == 3


def test_raising_a_quota_in_the_admin_places_a_waiting_task_at_once(client, staff, acme, servers, monkeypatch,
                                                                     django_capture_on_commit_callbacks):
    from django_q.conf import Conf

    from scheduling.passes import run_pass

    Quota.objects.filter(tenant=acme).update(max_gpus=0)
    task = Task.objects.create(tenant=acme, name="waits", command="true", gpu_memory_mb=1000)
    run_pass()
    task.refresh_from_db()
    assert task.status == "pending"
    assert "GPU quota" in task.pending_reason

    monkeypatch.setattr(Conf, "SYNC", True)  # the queued pass runs in this process, as a q worker would
    client.force_login(staff)
    with django_capture_on_commit_callbacks(execute=True):
        _post(client, acme, max_gpus="4")
    task.refresh_from_db()
    assert task.status == "assigned"
