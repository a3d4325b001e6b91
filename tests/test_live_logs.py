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


# --- a gang: one log per rank (server), chosen on the task page -----------------------------


@pytest.fixture
def gang(acme, alice):
    from scheduling.models import TaskRank
    from tests.conftest import make_server

    servers = [make_server("rank-a", gpus=2), make_server("rank-b", gpus=2)]
    task = Task.objects.create(tenant=acme, submitter=alice, name="ddp", command="torchrun train.py",
                               status=TaskStatus.RUNNING, gpu_count=4, nodes=2)
    for rank, node in enumerate(servers):
        TaskRank.objects.create(task=task, attempt=0, rank=rank, node=node)
        TaskLogChunk.objects.create(task=task, attempt=0, rank=rank, offset=0, data=f"hello from rank {rank}\n")
    return task


def test_the_task_page_of_a_gang_offers_every_rank_and_shows_the_chosen_ones_output(gang, alice, client):
    client.force_login(alice)
    first = client.get(f"/tasks/{gang.pk}/").content.decode()
    assert '<option value="0" selected>rank 0 · rank-a</option>' in first
    assert '<option value="1">rank 1 · rank-b</option>' in first
    assert "hello from rank 0" in first and "hello from rank 1" not in first
    second = client.get(f"/tasks/{gang.pk}/?rank=1").content.decode()
    assert "hello from rank 1" in second and "hello from rank 0" not in second
    assert 'data-rank="1"' in second and '<option value="1" selected>' in second
    assert f"/tasks/{gang.pk}/log/?attempt=0&amp;rank=1" in second  # the full log of that rank
    full = client.get(f"/tasks/{gang.pk}/log/?attempt=0&rank=1")
    assert b"".join(full.streaming_content) == b"hello from rank 1\n"
    for bad in ("2", "-1", "x", "\u0661"):  # no such rank (nor an Arabic-Indic 1): 400, never a 500
        assert client.get(f"/tasks/{gang.pk}/?rank={bad}").status_code == 400
        assert client.get(f"/tasks/{gang.pk}/log/?rank={bad}").status_code == 400
    # A one-server task has no selector.
    single = Task.objects.create(tenant=gang.tenant, submitter=alice, name="one", command="x")
    assert 'id="task-log-rank"' not in client.get(f"/tasks/{single.pk}/").content.decode()


def test_the_live_log_follows_the_chosen_rank(gang, alice):
    session = _cookie(alice)

    async def scenario() -> list[dict]:
        comm = _communicator(f"/ws/tasks/{gang.pk}/log/?rank=1", session)
        assert (await comm.connect(timeout=10))[0]
        first = await comm.receive_json_from(timeout=10)

        def write() -> None:
            TaskLogChunk.objects.create(task=gang, attempt=0, rank=0, offset=len("hello from rank 0\n"),
                                        data="rank 0 again\n")
            TaskLogChunk.objects.create(task=gang, attempt=0, rank=1, offset=len("hello from rank 1\n"),
                                        data="rank 1 again\n")
            live.log_appended(gang.pk)

        await sync_to_async(write)()
        more = await _receive_until(comm, lambda f: f["type"] == "log" and f["data"])
        await comm.disconnect()
        return [first, more]

    first, more = async_to_sync(scenario)()
    assert (first["reset"], first["data"]) == (True, "hello from rank 1\n")
    assert more["data"] == "rank 1 again\n"  # rank 0's new line is not this viewer's
