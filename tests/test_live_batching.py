"""Pushes queued in one transaction leave together after commit, and only what committed."""

from __future__ import annotations

import pytest
from django.db import transaction

from kernel import live


@pytest.fixture
def sent(monkeypatch) -> list[list[tuple[str, dict]]]:
    batches: list[list[tuple[str, dict]]] = []
    monkeypatch.setattr(live, "_send_all", lambda messages: batches.append(list(messages)))
    return batches


def test_a_transaction_sends_its_pushes_as_one_batch_after_commit(db, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        live.assignments_changed([3, 1])
        live.tasks_changed([(7, 70)])
        assert sent == []

    assert len(sent) == 1
    assert [group for group, _ in sent[0]] == ["node-1", "node-3", "tenant-7", "cluster"]


def test_pushes_from_a_rolled_back_savepoint_are_dropped(db, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        live.assignments_changed([1])
        try:
            with transaction.atomic():
                live.assignments_changed([2])
                raise RuntimeError
        except RuntimeError:
            pass

    assert [[group for group, _ in batch] for batch in sent] == [["node-1"]]
