"""The listings' filters (scheduling.filters, nodes.filters): one FilterSet per listing,
shared by the API and the portal pages, so a query means the same in both; a bad value
is a 400 naming the field, never a 500 or a quietly ignored filter."""

from __future__ import annotations

import re

import pytest

from scheduling.choices import TaskStatus
from scheduling.models import Task
from tenants.choices import Priority

pytestmark = pytest.mark.django_db


@pytest.fixture
def tasks(acme, globex, alice, bob, carol, servers):
    """One acme task in each state (alice's), a HIGH one of bob's, and a globex task."""
    for status in TaskStatus.values:
        Task.objects.create(tenant=acme, submitter=alice, name=f"a-{status}", command="x", status=status)
    Task.objects.create(tenant=acme, submitter=bob, name="b-pending", command="x", priority=Priority.HIGH)
    Task.objects.create(tenant=globex, submitter=carol, name="g-running", command="x", status=TaskStatus.RUNNING)


@pytest.fixture
def as_alice(api_client_for, alice):
    return api_client_for(alice)


@pytest.fixture
def alice_web(client, alice):
    client.force_login(alice)
    return client


def api_names(client, query: str) -> set[str]:
    r = client.get(f"/api/v1/tasks?{query}&limit=500")
    assert r.status_code == 200, r.content
    return {t["name"] for t in r.json()["results"]}


def page_names(client, query: str) -> set[str]:
    r = client.get(f"/tasks/?{query}")
    assert r.status_code == 200, r.content
    return set(re.findall(r"<td>([ab]-[a-z_]+)</td>", r.content.decode()))


@pytest.mark.parametrize(("query", "names"), [
    ("status=active", {"a-assigned", "a-running"}),
    ("status=pending,assigned,running", {"a-pending", "a-assigned", "a-running", "b-pending"}),
    ("status=pending&mine=true", {"a-pending"}),
    ("priority=high", {"b-pending"}),
    ("tenant=acme&status=timed_out", {"a-timed_out"}),
    ("status=succeeded,failed&priority=normal,low", {"a-succeeded", "a-failed"}),
])
def test_the_api_and_the_task_page_list_the_same_tasks_for_a_query(tasks, as_alice, alice_web, query, names):
    assert api_names(as_alice, query) == names
    assert page_names(alice_web, query) == names


def test_active_means_the_tasks_holding_gpus(tasks, as_alice):
    listed = as_alice.get("/api/v1/tasks?status=active").json()["results"]
    assert {t["status"] for t in listed} == {TaskStatus.ASSIGNED, TaskStatus.RUNNING}


@pytest.mark.parametrize(("query", "field", "words"), [
    ("status=sleeping", "status", "Unknown state 'sleeping'"),
    ("priority=urgent", "priority", "use LOW, NORMAL, HIGH, CRITICAL"),
    ("mine=maybe", "mine", "true or false"),
    ("array=x1", "array", "whole number"),
    ("array=-1", "array", "whole number"),
    ("ordering=name", "ordering", "'-created_at' or 'queue'"),
])
def test_a_bad_filter_value_is_a_400_naming_the_field_in_the_api_and_the_page(tasks, as_alice, alice_web, query,
                                                                                field, words):
    r = as_alice.get(f"/api/v1/tasks?{query}")
    assert r.status_code == 400 and words in r.json()[field][0], r.content
    page = alice_web.get(f"/tasks/?{query}")
    assert page.status_code == 400 and words in page.content.decode().replace("&#x27;", "'")
    assert "No tasks." in page.content.decode()


def test_the_filters_apply_to_the_list_only(tasks, as_alice):
    task = Task.objects.get(name="a-pending")
    assert as_alice.get(f"/api/v1/tasks/{task.pk}?status=running").status_code == 200


def test_the_task_pages_links_keep_the_filters(tasks, alice_web, acme, alice):
    Task.objects.bulk_create(Task(tenant=acme, submitter=alice, name=f"more-{i}", command="x") for i in range(60))
    page = alice_web.get("/tasks/?status=pending&mine=1").content.decode()
    assert 'href="?status=pending&amp;mine=1&page=2"' in page


@pytest.mark.parametrize(("path", "field"), [
    ("/api/v1/gpus?state=sleepy", "state"), ("/api/v1/gpus?server=%00", "server"),
    ("/api/v1/servers?status=broken", "status"),
])
def test_a_bad_inventory_filter_is_a_400_naming_the_field(as_alice, servers, path, field):
    r = as_alice.get(path)
    assert r.status_code == 400 and field in r.json(), r.content
