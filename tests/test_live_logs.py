"""A task's live log over the websocket: opens at the newest lines, streams what is
stored after, starts over for a requeued attempt, and only for those who see the task."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from kernel import live
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskLogChunk
from tests.conftest import reset_channel_layer
from tests.test_live_consumers import _communicator, _connect_refused, _cookie, _receive_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_layer():
    reset_channel_layer()
    yield
    reset_channel_layer()


@pytest.fixture
def running(acme, alice):
    task = Task.objects.create(tenant=acme, submitter=alice, name="train", command="x", status=TaskStatus.RUNNING)
    text = "".join(f"line {i}\n" for i in range(300))
    TaskLogChunk.objects.create(task=task, attempt=0, offset=0, data=text)
    return task


def _append(task: Task, attempt: int, data: str) -> None:
    last = TaskLogChunk.objects.filter(task=task, attempt=attempt).order_by("-offset").first()
    offset = last.offset + len(last.data.encode()) if last else 0
    TaskLogChunk.objects.create(task=task, attempt=attempt, offset=offset, data=data)
    live.log_appended(task.pk)


def test_the_log_opens_at_the_newest_lines_and_follows_new_output(running, alice):
    session = _cookie(alice)

    async def scenario() -> list[dict]:
        comm = _communicator(f"/ws/tasks/{running.pk}/log/", session)
        assert (await comm.connect(timeout=10))[0]
        first = await comm.receive_json_from(timeout=10)
        await sync_to_async(_append)(running, 0, "epoch 2 done\n")
        more = await _receive_until(comm, lambda f: f["type"] == "log" and f["data"])
        await comm.disconnect()
        return [first, more]

    first, more = async_to_sync(scenario)()
    assert first["reset"] and first["attempt"] == 0
    assert first["data"].splitlines()[0] == "line 100" and first["data"].endswith("line 299\n")  # the last 200
    assert more == {"type": "log", "attempt": 0, "offset": first["offset"] + len(first["data"]),
                    "data": "epoch 2 done\n", "final": False, "reset": False}


def test_a_page_continues_from_the_offset_it_rendered_and_a_requeue_starts_over(running, alice):
    session = _cookie(alice)
    rendered = len("".join(f"line {i}\n" for i in range(300)).encode())

    async def scenario() -> list[dict]:
        comm = _communicator(f"/ws/tasks/{running.pk}/log/?attempt=0&offset={rendered}", session)
        assert (await comm.connect(timeout=10))[0]
        assert await comm.receive_nothing(timeout=0.3)  # nothing new yet: nothing sent twice

        def requeue() -> None:
            Task.objects.filter(pk=running.pk).update(attempt=1)
            _append(running, 1, "attempt two starts\n")

        await sync_to_async(requeue)()
        frame = await _receive_until(comm, lambda f: f["type"] == "log")
        await comm.disconnect()
        return [frame]

    (frame,) = async_to_sync(scenario)()
    assert (frame["reset"], frame["attempt"], frame["offset"], frame["data"]) == (True, 1, 0, "attempt two starts\n")


def test_only_those_who_see_the_task_may_follow_its_log(running, carol, staff):
    assert _connect_refused(f"/ws/tasks/{running.pk}/log/", None)
    assert _connect_refused(f"/ws/tasks/{running.pk}/log/", _cookie(carol))
    assert not _connect_refused(f"/ws/tasks/{running.pk}/log/", _cookie(staff))
