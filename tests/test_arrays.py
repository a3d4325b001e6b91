"""Task arrays through the API: Slurm's syntax, the throttle, listing and cancelling as one."""

from __future__ import annotations

import dataclasses

import pytest

from scheduling import arrays, lifecycle
from scheduling.models import Task
from scheduling.passes import run_pass

pytestmark = pytest.mark.django_db


@pytest.fixture
def as_alice(api_client_for, alice, servers, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    return api_client_for(alice)


@pytest.mark.parametrize(("spec", "indexes", "throttle"), [
    ("0-3", [0, 1, 2, 3], 0),
    ("0-99%8", list(range(100)), 8),
    ("1,3,5-7", [1, 3, 5, 6, 7], 0),
    ("0-15:4%2", [0, 4, 8, 12], 2),
    ("7", [7], 0),
])
def test_slurm_array_syntax(spec, indexes, throttle):
    assert arrays.parse(spec, 1000) == (indexes, throttle, None)


@pytest.mark.parametrize(("spec", "words"), [
    ("5-1", "Bad range"), ("a-b", "Cannot read"), ("0-9%0", "at least 1"), ("0-5000", "At most 1000"),
    ("%4", "Cannot read"),
])
def test_a_bad_array_is_refused_through_the_api(as_alice, spec, words):
    r = as_alice.post("/api/v1/tasks", {"command": "x", "array": spec}, format="json")
    assert r.status_code == 400 and words in " ".join(r.json()["array"]), r.json()
    assert not Task.objects.exists()


def test_an_array_runs_at_most_its_throttle_at_once_and_cancels_as_one(as_alice):
    r = as_alice.post("/api/v1/tasks", {"command": "python sweep.py", "name": "sweep", "array": "0-9%3",
                                        "env": {"LR": "0.1"}}, format="json")
    assert r.status_code == 201, r.content
    array_id = r.json()["array_id"]
    elements = Task.objects.filter(array_id=array_id).order_by("array_index")
    assert [t.array_index for t in elements] == list(range(10))
    assert elements[4].env == {"LR": "0.1", "TASK_ARRAY_ID": str(array_id), "TASK_ARRAY_INDEX": "4",
                               "SLURM_ARRAY_JOB_ID": str(array_id), "SLURM_ARRAY_TASK_ID": "4"}
    run_pass()
    assert Task.objects.filter(array_id=array_id, status="assigned").count() == 3
    held = Task.objects.filter(array_id=array_id, status="pending").first()
    assert held.pending_reason == f"array #{array_id} runs at most 3 elements at once (%3)"

    done = Task.objects.filter(array_id=array_id, status="assigned").first()
    lifecycle.report_finished(done.pk, node_id=done.node_id, exit_code=0, actor="agent")
    run_pass()
    assert Task.objects.filter(array_id=array_id, status="assigned").count() == 3

    shown = as_alice.get(f"/api/v1/arrays/{array_id}").json()
    assert (shown["size"], shown["throttle"], shown["spec"]) == (10, 3, "0-9%3")
    assert shown["counts"] == {"pending": 6, "assigned": 3, "succeeded": 1}
    listed = as_alice.get(f"/api/v1/tasks?array={array_id}").json()
    assert listed["count"] == 10 and {t["array_id"] for t in listed["results"]} == {array_id}

    cancelled = as_alice.post(f"/api/v1/arrays/{array_id}/cancel").json()
    assert cancelled["counts"] == {"succeeded": 1, "cancelled": 9}


def test_another_tenant_cannot_see_an_array(as_alice, api_client_for, carol):
    array_id = as_alice.post("/api/v1/tasks", {"command": "x", "array": "0-1"}, format="json").json()["array_id"]
    assert api_client_for(carol).get(f"/api/v1/arrays/{array_id}").status_code == 404
    assert api_client_for(carol).post(f"/api/v1/arrays/{array_id}/cancel").status_code == 404


def test_the_portal_task_list_folds_an_array_onto_one_line_with_counts_by_state(as_alice, alice, client):
    import re

    r = as_alice.post("/api/v1/tasks", {"command": "python sweep.py", "name": "sweep", "array": "0-5%2"},
                      format="json")
    array_id = r.json()["array_id"]
    single = as_alice.post("/api/v1/tasks", {"command": "python eval.py", "name": "evaluate"}, format="json").json()
    run_pass()  # two elements start (the throttle), four wait
    client.force_login(alice)
    page = client.get("/tasks/").content.decode()
    rows = re.findall(r"<tr data-(?:array|task)-row=\"(\d+)\"", page)
    assert len(rows) == 2 and str(single["id"]) in rows and str(array_id) in rows  # one line for six tasks
    row = page[page.index(f'data-array-row="{array_id}"'):]
    row = row[:row.index("</tr>")]
    assert re.findall(r'data-state="(\w+)">(\d+) ', row) == [("pending", "4"), ("assigned", "2")]
    assert "6 elements" in row and "runs at most 2 elements at once" in row
    assert f'href="/tasks/?array={array_id}"' in row  # the way to its elements
    # Expanded: each element on its own line, with the filters kept.
    expanded = client.get(f"/tasks/?array={array_id}").content.decode()
    assert len(re.findall(r'<tr data-task-row="\d+"', expanded)) == 6 and "data-array-row" not in expanded
    running = client.get(f"/tasks/?array={array_id}&status=assigned").content.decode()
    assert len(re.findall(r'<tr data-task-row="\d+"', running)) == 2
    # A state filter folds what it keeps.
    pending = client.get("/tasks/?status=pending").content.decode()
    assert re.findall(r'data-state="(\w+)">(\d+) ', pending) == [("pending", "4")]
    assert client.get("/tasks/?array=x").status_code == 400
