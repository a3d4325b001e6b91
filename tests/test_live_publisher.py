"""The background publisher: committed pushes leave from one thread per process,
merged while it is busy, and a rolled-back change is never published."""

from __future__ import annotations

import threading

import pytest
from django.db import transaction

from kernel import live
from tests.conftest import wait_for


@pytest.fixture
def published(settings, monkeypatch):
    """Batches as the publisher thread sends them; ``gate`` holds the thread inside a send."""
    settings.LIVE_PUBLISH_IN_BACKGROUND = True
    batches: list[list[tuple[str, dict]]] = []
    gate = threading.Event()
    gate.set()
    senders: list[str] = []

    async def record(layer, messages):
        senders.append(threading.current_thread().name)
        batches.append(list(messages))
        gate.wait(10)

    monkeypatch.setattr(live, "_send_messages", record)
    yield batches, gate, senders
    gate.set()
    assert live.publisher.flush(10)


def test_a_committed_change_is_pushed_from_the_publisher_thread_after_commit(transactional_db, published):
    batches, _, senders = published
    with transaction.atomic():
        live.tasks_changed([(7, 70)])
        assert live.publisher.flush(5)
        assert batches == []  # not before the commit

    wait_for(lambda: batches, 10, "the push")
    assert [[(g, m["type"], m.get("task_ids")) for g, m in b] for b in batches] == [
        [("tenant-7", "tasks.changed", [70]), ("cluster", "tasks.changed", [70])]]
    assert senders == ["live-publisher"]


def test_a_rolled_back_change_is_never_pushed(transactional_db, published):
    batches, _, _ = published
    with pytest.raises(RuntimeError), transaction.atomic():
        live.assignments_changed([1])
        raise RuntimeError
    with transaction.atomic():
        live.assignments_changed([2])

    assert live.publisher.flush(10)
    assert [[g for g, _ in b] for b in batches] == [["node-2"]]


def test_changes_committed_while_the_publisher_is_busy_leave_as_one_merged_batch(transactional_db, published):
    batches, gate, _ = published
    gate.clear()  # the first send blocks until released
    with transaction.atomic():
        live.gpus_changed([1])
    wait_for(lambda: batches, 10, "the first send")
    for node_ids in ([2, 3], [3, 4]):
        with transaction.atomic():
            live.gpus_changed(node_ids)
    live.send_on_commit(live.STAFF_GROUP, "alert.raised", {"alert": {"id": 1}})
    live.send_on_commit(live.STAFF_GROUP, "alert.raised", {"alert": {"id": 2}})
    gate.set()

    assert live.publisher.flush(10)
    assert len(batches) == 2
    assert batches[1] == [("cluster", {"type": "gpus.changed", "node_ids": [2, 3, 4]}),
                          ("cluster", {"type": "alert.raised", "alert": {"id": 1}}),
                          ("cluster", {"type": "alert.raised", "alert": {"id": 2}})]


def test_a_push_after_a_quiet_spell_leaves_at_once_and_a_stream_is_merged_per_interval(
        transactional_db, published, settings):
    batches, _, _ = published
    assert live.publisher.flush(10)
    settings.LIVE_PUBLISH_MIN_INTERVAL_MS = 0
    with transaction.atomic():
        live.gpus_changed([1])  # the interval has passed: at once
    wait_for(lambda: batches, 10, "the first push")
    with live.publisher._lock:  # that send is over
        assert live.publisher._wake.wait_for(lambda: not live.publisher._busy, 10)

    settings.LIVE_PUBLISH_MIN_INTERVAL_MS = 3_600_000  # the next batch may leave an hour after that one
    for node_ids in ([2], [3, 4]):
        with transaction.atomic():
            live.gpus_changed(node_ids)
    with live.publisher._lock:  # both are merged, waiting for the interval
        assert live.publisher._pending is not None and not live.publisher._busy
    assert len(batches) == 1

    settings.LIVE_PUBLISH_MIN_INTERVAL_MS = 0  # the interval is over: the publisher is woken by the next commit
    with transaction.atomic():
        live.gpus_changed([5])
    assert live.publisher.flush(10)
    assert batches[1:] == [[("cluster", {"type": "gpus.changed", "node_ids": [2, 3, 4, 5]})]]


def test_an_agents_assignments_never_wait_for_the_interval(transactional_db, published, settings):
    batches, _, _ = published
    settings.LIVE_PUBLISH_MIN_INTERVAL_MS = 0
    with transaction.atomic():
        live.gpus_changed([1])
    wait_for(lambda: batches, 10, "the first push")
    settings.LIVE_PUBLISH_MIN_INTERVAL_MS = 3_600_000
    with transaction.atomic():
        live.gpus_changed([2])
        live.assignments_changed([9])  # on the way from a submit to a running process

    wait_for(lambda: len(batches) == 2, 10, "the agent's push, without waiting an hour")
    assert [g for g, _ in batches[1]] == ["cluster", "node-9"]
