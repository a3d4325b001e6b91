"""Websocket consumers: who may connect, what each viewer receives, and that bursts
of changes are merged. Real channel layer (Postgres, or Redis with REDIS_URL)."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client

from kernel import live
from nodes.models import GPU
from portal.asgi import application
from scheduling.models import Allocation, Task
from tenants.models import Membership
from tests.conftest import reset_channel_layer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_layer():
    reset_channel_layer()
    yield
    reset_channel_layer()


def _cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def _communicator(path: str, session: str | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    if session:
        headers.append((b"cookie", f"sessionid={session}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def _receive_until(comm: WebsocketCommunicator, predicate, timeout: float = 10.0) -> dict:
    """The first frame matching predicate (frames before it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no matching frame before the deadline")
        frame = await comm.receive_json_from(timeout=remaining)
        if predicate(frame):
            return frame


def _connect_refused(path: str, session: str | None) -> bool:
    async def scenario() -> bool:
        comm = _communicator(path, session)
        connected, _ = await comm.connect(timeout=10)
        await comm.disconnect()
        return not connected

    return async_to_sync(scenario)()


def test_anonymous_viewers_are_refused_everywhere(db):
    for path in ["/ws/cluster/", "/ws/tasks/", "/ws/tasks/acme/"]:
        assert _connect_refused(path, None), path


def test_the_cluster_feed_is_refused_to_a_portal_user(alice):
    assert _connect_refused("/ws/cluster/", _cookie(alice))


def test_a_user_cannot_watch_a_tenant_they_do_not_belong_to(alice, carol):
    assert _connect_refused("/ws/tasks/globex/", _cookie(alice))
    assert _connect_refused("/ws/tasks/nope/", _cookie(alice))


def test_a_user_without_any_tenant_is_refused_the_task_feed(db):
    loner = get_user_model().objects.create_user("loner", password="pw")
    assert _connect_refused("/ws/tasks/", _cookie(loner))


def test_staff_see_every_gpu_first_and_then_its_changes(staff, servers):
    gpu = servers[0].gpus.get(index=3)
    session = _cookie(staff)

    async def scenario() -> tuple[dict, dict]:
        comm = _communicator("/ws/cluster/", session)
        connected, _ = await comm.connect(timeout=10)
        assert connected
        first = await comm.receive_json_from(timeout=10)

        def change() -> None:
            with transaction.atomic():
                GPU.objects.filter(pk=gpu.pk).update(utilization_pct=87, temperature_c=71, memory_used_mb=40_000)
                live.gpus_changed([gpu.node_id])

        await sync_to_async(change)()
        update = await _receive_until(comm, lambda f: f["type"] == "gpus")
        await comm.disconnect()
        return first, update

    first, update = async_to_sync(scenario)()
    assert first["type"] == "gpus" and first["full"] is True
    assert len(first["gpus"]) == 16 and {n["name"] for n in first["nodes"]} == {"gpu-01", "gpu-02"}
    assert {g["node_id"] for g in update["gpus"]} == {gpu.node_id}
    row = next(g for g in update["gpus"] if g["id"] == gpu.pk)
    assert (row["utilization_pct"], row["temperature_c"], row["memory_used_mb"]) == (87, 71, 40_000)
    assert row["state"] == "free"


def test_a_gpu_row_names_its_current_task_and_tenant(staff, acme, alice, servers):
    gpu = servers[0].gpus.get(index=0)
    task = Task.objects.create(tenant=acme, submitter=alice, name="train", command="x", status="running",
                               node=servers[0])
    Allocation.objects.create(task=task, gpu=gpu, node=servers[0], memory_mb=30_000)
    session = _cookie(staff)

    async def scenario() -> dict:
        comm = _communicator("/ws/cluster/", session)
        assert (await comm.connect(timeout=10))[0]
        first = await comm.receive_json_from(timeout=10)
        await comm.disconnect()
        return first

    row = next(g for g in async_to_sync(scenario)()["gpus"] if g["id"] == gpu.pk)
    assert row["state"] == "allocated" and row["task"] == f"#{task.pk} train" and row["tenant"] == "acme"


def test_members_receive_only_their_own_tenants_tasks(acme, globex, alice, carol):
    mine = Task.objects.create(tenant=acme, name="mine", command="x")
    theirs = Task.objects.create(tenant=globex, name="theirs", command="x")
    alice_session, carol_session = _cookie(alice), _cookie(carol)

    async def scenario() -> tuple[list[dict], list[dict]]:
        a = _communicator("/ws/tasks/", alice_session)
        c = _communicator("/ws/tasks/globex/", carol_session)
        assert (await a.connect(timeout=10))[0]
        assert (await c.connect(timeout=10))[0]

        def change() -> None:
            with transaction.atomic():
                Task.objects.filter(pk__in=[mine.pk, theirs.pk]).update(status="cancelled")
                live.tasks_changed([(acme.pk, mine.pk), (globex.pk, theirs.pk)])

        await sync_to_async(change)()
        a_frame = await _receive_until(a, lambda f: f["type"] == "tasks")
        c_frame = await _receive_until(c, lambda f: f["type"] == "tasks")
        a_usage = await _receive_until(a, lambda f: f["type"] == "usage")
        # Nothing else arrives for alice: carol's task never reaches her socket.
        assert await a.receive_nothing(timeout=0.5)
        await a.disconnect()
        await c.disconnect()
        return a_frame["tasks"], c_frame["tasks"], a_usage["tenants"]

    alice_tasks, carol_tasks, usage = async_to_sync(scenario)()
    assert [(t["id"], t["status"]) for t in alice_tasks] == [(mine.pk, "cancelled")]
    assert [t["id"] for t in carol_tasks] == [theirs.pk]
    assert [u["id"] for u in usage] == [acme.pk] and usage[0]["limits"]["gpus"] == 8


def test_a_membership_removed_while_connected_stops_the_feed(acme, alice, monkeypatch):
    import portal.consumers

    monkeypatch.setattr(portal.consumers, "MEMBERSHIP_RECHECK_S", 0.0)
    task = Task.objects.create(tenant=acme, name="t", command="x")
    session = _cookie(alice)

    async def scenario() -> dict:
        comm = _communicator("/ws/tasks/", session)
        assert (await comm.connect(timeout=10))[0]
        await sync_to_async(Membership.objects.filter(user=alice).delete)()
        await sync_to_async(live.tasks_changed)([(acme.pk, task.pk)])
        out = await comm.receive_output(timeout=10)
        await comm.disconnect()
        return out

    out = async_to_sync(scenario)()
    assert out["type"] == "websocket.close" and out["code"] == 4403


def test_a_burst_of_changes_reaches_a_viewer_as_a_few_frames(staff, servers, settings):
    settings.LIVE_MIN_INTERVAL_MS = 300
    gpus = list(GPU.objects.filter(node=servers[0]).order_by("index"))
    session = _cookie(staff)

    async def scenario() -> list[dict]:
        comm = _communicator("/ws/cluster/", session)
        assert (await comm.connect(timeout=10))[0]
        await comm.receive_json_from(timeout=10)  # the full picture

        def burst() -> None:
            # 40 separate commits (heartbeats from one server), each announced.
            for i in range(40):
                gpu = gpus[i % len(gpus)]
                GPU.objects.filter(pk=gpu.pk).update(utilization_pct=i + 1)
                live.gpus_changed([gpu.node_id])

        started = time.monotonic()
        await sync_to_async(burst)()
        frames = []
        # Collect until the last value is on screen.
        while True:
            frame = await comm.receive_json_from(timeout=10)
            frames.append(frame)
            if any(g["utilization_pct"] == 40 for g in frame.get("gpus", [])):
                break
        elapsed = time.monotonic() - started
        await comm.disconnect()
        return frames, elapsed

    frames, elapsed = async_to_sync(scenario)()
    # One frame per 300 ms at most: never one per commit.
    assert len(frames) <= elapsed / 0.3 + 2, (len(frames), elapsed)
    assert len(frames) < 40


def test_commits_in_one_transaction_become_one_message_per_group(acme, globex, monkeypatch):
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(live, "_send_all", sent.extend)
    with transaction.atomic():
        for i in range(50):
            live.tasks_changed([(acme.pk, i), (globex.pk, 1000 + i)])
            live.gpus_changed([i % 3])
        assert sent == []  # nothing before commit
    groups = sorted(g for g, _ in sent)
    assert groups == sorted(["cluster", "cluster", f"tenant-{acme.pk}", f"tenant-{globex.pk}"])
    by = {(g, m["type"]): m for g, m in sent}
    assert by[(f"tenant-{acme.pk}", "tasks.changed")]["task_ids"] == list(range(50))
    assert by[("cluster", "gpus.changed")]["node_ids"] == [0, 1, 2]
    assert len(by[("cluster", "tasks.changed")]["task_ids"]) == 100


def test_a_rolled_back_transaction_pushes_nothing(acme, monkeypatch):
    sent: list = []
    monkeypatch.setattr(live, "_send_all", sent.extend)
    with pytest.raises(RuntimeError), transaction.atomic():
        live.tasks_changed([(acme.pk, 1)])
        raise RuntimeError("boom")
    with transaction.atomic():
        live.gpus_changed([7])
        with pytest.raises(RuntimeError), transaction.atomic():
            live.gpus_changed([8])
            live.tasks_changed([(acme.pk, 2)])
            raise RuntimeError("inner")
    assert sent == [("cluster", {"type": "gpus.changed", "node_ids": [7]})]


def test_pushes_outside_a_transaction_go_at_once(acme, monkeypatch):
    sent: list = []
    monkeypatch.setattr(live, "_send_all", sent.extend)
    live.assignments_changed([3, 3])
    assert sent == [("node-3", {"type": "assignments.changed", "node_id": 3})]


def test_a_failed_shared_query_is_raised_to_every_viewer_waiting_on_it():
    # Guard for the shared-query cache: a failing fetch is re-raised to every waiter.
    from portal.consumers import _SharedQueries

    cache = _SharedQueries()

    async def scenario() -> list:
        async def boom():
            await asyncio.sleep(0.05)
            raise ValueError("db down")

        results = await asyncio.gather(
            cache.get("k", 0.0, boom), cache.get("k", 0.0, boom), return_exceptions=True
        )
        return results

    results = async_to_sync(scenario)()
    assert all(isinstance(r, ValueError) for r in results)


def test_a_message_delivered_twice_reaches_the_viewer_once(staff, servers):
    from channels.layers import get_channel_layer

    session = _cookie(staff)

    async def scenario() -> bool:
        comm = _communicator("/ws/cluster/", session)
        assert (await comm.connect(timeout=10))[0]
        await comm.receive_json_from(timeout=10)  # the full picture
        message = {"type": "gpus.changed", "node_ids": [servers[0].pk], "mid": "same-id"}
        layer = get_channel_layer()
        await layer.group_send("cluster", message)
        await layer.group_send("cluster", message)
        await _receive_until(comm, lambda f: f["type"] == "gpus")
        quiet = await comm.receive_nothing(timeout=0.6)
        await comm.disconnect()
        return quiet

    assert async_to_sync(scenario)()


def test_a_server_heard_during_the_quiet_second_is_pushed_at_its_end(monkeypatch):
    from nodes import heartbeat

    pushed: list[tuple[float, list[int]]] = []
    monkeypatch.setattr(heartbeat, "PUSH_EVERY_S", 0.3)
    monkeypatch.setattr(heartbeat.live, "gpus_changed", lambda ids: pushed.append((time.monotonic(), list(ids))))
    heartbeat._flush_pushes()  # start a quiet period now
    pushed.clear()
    started = time.monotonic()
    heartbeat._queue_push(1, urgent=False)
    heartbeat._queue_push(2, urgent=False)
    deadline = time.monotonic() + 5
    while not pushed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [ids for _, ids in pushed] == [[1, 2]]
    assert 0.2 <= pushed[0][0] - started < 2


def test_staff_receive_every_tenants_task_changes_usage_and_alerts(staff, acme, globex, servers):
    from kernel.alerts import raise_alert

    mine = Task.objects.create(tenant=acme, name="a", command="x")
    theirs = Task.objects.create(tenant=globex, name="g", command="x")
    session = _cookie(staff)

    async def scenario() -> tuple[dict, dict, dict]:
        comm = _communicator("/ws/cluster/", session)
        assert (await comm.connect(timeout=10))[0]
        await comm.receive_json_from(timeout=10)  # the full picture
        await sync_to_async(live.tasks_changed)([(acme.pk, mine.pk), (globex.pk, theirs.pk)])
        tasks = await _receive_until(comm, lambda f: f["type"] == "tasks")
        usage = await _receive_until(comm, lambda f: f["type"] == "usage")

        def alert() -> None:
            with transaction.atomic():
                raise_alert("server_lost", "gpu-01 lost", node=servers[0])

        await sync_to_async(alert)()
        banner = await _receive_until(comm, lambda f: f["type"] == "alert")
        await comm.disconnect()
        return tasks, usage, banner

    tasks, usage, banner = async_to_sync(scenario)()
    assert sorted(t["id"] for t in tasks["tasks"]) == sorted([mine.pk, theirs.pk])
    assert sorted(u["id"] for u in usage["tenants"]) == sorted([acme.pk, globex.pk])
    assert banner["alert"]["kind"] == "server_lost" and banner["alert"]["message"] == "gpu-01 lost"
