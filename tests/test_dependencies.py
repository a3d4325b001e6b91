"""Task dependencies through the API and the pass: chains, failures cancelling dependents, bad ids."""

from __future__ import annotations

import dataclasses

import pytest

from scheduling import lifecycle
from scheduling.models import Task
from scheduling.passes import run_pass

pytestmark = pytest.mark.django_db


@pytest.fixture
def as_alice(api_client_for, alice, servers, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    return api_client_for(alice)


def submit(client, **fields):
    r = client.post("/api/v1/tasks", {"command": "python step.py", **fields}, format="json")
    assert r.status_code == 201, r.content
    return Task.objects.get(pk=r.json()["id"])


def end(task: Task, exit_code: int) -> None:
    task.refresh_from_db()
    lifecycle.report_finished(task.pk, node_id=task.node_id, exit_code=exit_code, actor="agent")


def test_a_chain_runs_in_order_and_waits_with_a_reason(as_alice):
    prep = submit(as_alice, name="preprocess")
    train = submit(as_alice, name="train", dependency={"after_ok": [prep.pk]})
    evaluate = submit(as_alice, name="evaluate", dependency=f"afterany:{train.pk}")
    run_pass()
    prep.refresh_from_db(), train.refresh_from_db(), evaluate.refresh_from_db()
    assert prep.status == "assigned"
    assert (train.status, train.pending_reason) == ("pending", f"waiting for task #{prep.pk} to succeed")
    assert evaluate.pending_reason == f"waiting for task #{train.pk} to end"
    assert as_alice.get(f"/api/v1/tasks/{evaluate.pk}").json()["dependency"] == {"after_any": [train.pk]}
    end(prep, 0)
    run_pass()
    train.refresh_from_db()
    assert train.status == "assigned"
    end(train, 1)  # evaluate runs after any end
    run_pass()
    evaluate.refresh_from_db()
    assert evaluate.status == "assigned"


def test_a_dependency_that_can_no_longer_be_satisfied_cancels_its_dependent(as_alice):
    prep = submit(as_alice)
    train = submit(as_alice, dependency={"after_ok": [prep.pk]})
    cleanup = submit(as_alice, dependency=f"afternotok:{prep.pk}")
    run_pass()
    end(prep, 2)
    run_pass()
    train.refresh_from_db(), cleanup.refresh_from_db()
    assert train.status == "cancelled"
    assert train.events.get(to_status="cancelled").reason == (
        f"dependency can never be satisfied: task #{prep.pk} ended failed, it was to succeed")
    assert cleanup.status == "assigned"


def test_with_the_setting_off_an_unsatisfiable_dependent_stays_pending_with_the_reason(as_alice, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, cancel_invalid_dependents=False)
    prep = submit(as_alice)
    after_fail = submit(as_alice, dependency={"after_not_ok": [prep.pk]})
    run_pass()
    end(prep, 0)
    run_pass()
    after_fail.refresh_from_db()
    assert after_fail.status == "pending"
    assert after_fail.pending_reason.startswith(f"dependency can never be satisfied: task #{prep.pk} ended succeeded")


@pytest.mark.parametrize(("value", "words"), [
    ({"after_ok": [999_999]}, "Unknown task #999999"),
    ("afterok:999999", "Unknown task #999999"),
    ("aftersome:1", "Cannot read"),
    ({"before": [1]}, "Unknown kind"),
    ({"after_ok": ["x"]}, "whole numbers"),
    (12, "Must be an object"),
])
def test_a_bad_dependency_is_refused_with_a_field_message(as_alice, value, words):
    r = as_alice.post("/api/v1/tasks", {"command": "x", "dependency": value}, format="json")
    assert r.status_code == 400
    assert words in " ".join(r.json()["dependency"]), r.json()


def test_another_tenants_task_cannot_be_depended_on(as_alice, globex):
    theirs = Task.objects.create(tenant=globex, name="secret", command="x")
    r = as_alice.post("/api/v1/tasks", {"command": "x", "dependency": {"after_ok": [theirs.pk]}}, format="json")
    assert r.status_code == 400 and f"Unknown task #{theirs.pk}" in r.json()["dependency"][0]
