"""The PostgreSQL channel layer used from two event loops at once, as a web process uses it
(the server's loop: consumers and the LISTEN task; the live publisher's thread: pushes)."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from django.db import connection

from portal.channel_layer import PostgresChannelLayer, forget_pool

pytestmark = pytest.mark.django_db(transaction=True)


def postgres_layer() -> PostgresChannelLayer:
    """The Postgres layer on the test database, whatever layer the settings name (CI: Redis)."""
    s = connection.settings_dict
    return PostgresChannelLayer(ENGINE="django.db.backends.postgresql", NAME=s["NAME"], USER=s["USER"],
                                PASSWORD=s["PASSWORD"], HOST=s["HOST"], PORT=s["PORT"], OPTIONS={},
                                TIME_ZONE=None, CONN_MAX_AGE=0, CONN_HEALTH_CHECKS=False, AUTOCOMMIT=True,
                                ATOMIC_REQUESTS=False, TEST={})


def test_two_event_loops_each_get_a_pool_and_neither_fails_under_contention():
    layer = postgres_layer()
    start = threading.Barrier(2)
    results: dict[str, str] = {}

    async def burst(name: str) -> None:
        channel = await layer.new_channel()
        await layer.group_add(f"group-{name}", channel)
        # More at once than a pool holds connections: some must wait for one, on this loop.
        await asyncio.gather(*(layer.group_send(f"group-{name}", {"type": "x", "n": i}) for i in range(16)))
        await asyncio.gather(*(layer.group_send(f"group-{name}", {"type": "x", "n": i}) for i in range(16)))

    def loop_thread(name: str) -> None:
        try:
            start.wait(10)
            asyncio.run(burst(name))
            results[name] = "ok"
        except Exception as exc:  # reported below, with the other loop's outcome
            results[name] = repr(exc)

    threads = [threading.Thread(target=loop_thread, args=(name,)) for name in ("server", "publisher")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        forget_pool()
    assert results == {"server": "ok", "publisher": "ok"}


def test_a_closed_loops_pool_is_hung_up_at_the_next_use():
    from portal import channel_layer

    layer = postgres_layer()
    try:
        for _ in range(3):  # as async_to_sync does: a fresh loop per call
            asyncio.run(layer.group_send("nobody", {"type": "x"}))
        assert len(channel_layer._pools) == 1  # only the last loop's, until the next use
        asyncio.run(layer.group_send("nobody", {"type": "x"}))
        assert len(channel_layer._pools) == 1
    finally:
        forget_pool()
    assert channel_layer._pools == {}


def test_a_group_send_reaches_every_member_and_an_empty_group_quietly_adds_nothing(caplog):
    from channels_postgres.models import Message

    layer = postgres_layer()
    members: list[str] = []

    async def send() -> None:
        members.extend([await layer.new_channel(), await layer.new_channel()])
        for channel in members:
            await layer.group_add("viewers", channel)
        await layer.group_send("viewers", {"type": "tasks.changed", "task_ids": [7]})
        await layer.group_send("nobody-here", {"type": "tasks.changed", "task_ids": [8]})

    async def receive() -> list[dict]:
        return [await asyncio.wait_for(layer.receive(channel), 10) for channel in members]

    try:
        asyncio.run(send())
        queued = sorted(Message.objects.values_list("channel", flat=True))
        received = asyncio.run(receive())
    finally:
        forget_pool()
    assert queued == sorted(members)  # one row per member, none for the empty group
    assert [m["task_ids"] for m in received] == [[7], [7]]
    assert "does not exist" not in caplog.text


def test_a_group_send_to_an_empty_group_is_one_round_trip(monkeypatch):
    from portal.channel_layer import _Database

    layer = postgres_layer()
    statements: list[str] = []
    original = psycopg.AsyncCursor.execute

    async def counting(self, query, *args, **kwargs):
        statements.append(str(query))
        return await original(self, query, *args, **kwargs)

    async def scenario() -> None:
        await layer.django_db.get_db_pool(db_params=layer.db_params)  # the pool's own set-up is not counted
        monkeypatch.setattr(psycopg.AsyncCursor, "execute", counting)
        await layer.group_send("nobody-here", {"type": "x"})

    try:
        asyncio.run(scenario())
    finally:
        forget_pool()
    assert isinstance(layer.django_db, _Database) and len(statements) == 1
