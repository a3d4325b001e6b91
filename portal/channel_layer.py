"""The PostgreSQL channel layer, made to survive a database restart.

``channels_postgres`` keeps one connection pool per process and one LISTEN
connection per receiving process, and recovers from neither when PostgreSQL
restarts: the pool's maintenance tasks live on the event loop that opened it (in
sync code, ``async_to_sync`` runs each call on a fresh loop that is closed
afterwards), so broken connections are never replaced and every push waits 30 s
for a ``PoolTimeout``; and the LISTEN task dies with its connection, so daphne
delivers nothing until it is restarted by hand.

This subclass changes only that:

- a send that fails on a database error drops the pool (its connections are dead)
  and is tried once more on a fresh one, opened with a short timeout, so a push
  after a restart succeeds at once and a push while the database is down fails
  within seconds instead of hanging;
- the LISTEN task reconnects with capped exponential backoff, logged once per
  outage, and on reconnecting delivers the messages queued meanwhile (the parent
  reads unexpired messages first; ``kernel.live`` stamps ids, so consumers drop a
  copy delivered twice);
- each event loop gets its own pool. A psycopg async pool belongs to the loop that
  opened it (its maintenance tasks, its locks), and a web process runs the layer on
  two: the server's (consumers, the LISTEN task) and the live publisher's thread
  (``kernel.live``). With one pool per process, whichever loop opened it first owned
  it, and a wait for a connection from the other loop failed ("Lock is not acquired"):
  seen killing the LISTEN task of a web node at start-up, after which the node
  delivered nothing and its agents fell back to long polls. Pools of loops that have
  closed (``async_to_sync`` runs each call on a fresh one) are hung up at the next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import typing
from datetime import timedelta

import psycopg
import psycopg_pool
from channels_postgres import db as channels_db
from channels_postgres.core import PostgresChannelLayer as _BaseLayer
from psycopg import sql

log = logging.getLogger(__name__)

# How long a send may wait for a pooled connection, and a new pool for its first ones.
GETCONN_TIMEOUT_S = 5.0
OPEN_TIMEOUT_S = 5.0
# The LISTEN connection retries from this delay, doubling up to the cap.
RELISTEN_FIRST_S = 0.2
RELISTEN_CAP_S = 2.0

_DB_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, OSError)


# id(loop) -> (the loop, its pool); the loop is held so that its id is not reused meanwhile.
_pools: dict[int, tuple[asyncio.AbstractEventLoop, psycopg_pool.AsyncConnectionPool]] = {}
_opening: dict[int, asyncio.Lock] = {}  # one pool opened at a time per loop
_pools_lock = threading.Lock()  # the loops' threads share the two dicts


def _hang_up(pool: psycopg_pool.AsyncConnectionPool) -> None:
    """Close a pool's connections at the libpq level (its loop may be closed already)."""
    for conn in list(getattr(pool, "_pool", [])):
        with contextlib.suppress(Exception):
            conn.pgconn.finish()
    with contextlib.suppress(Exception):
        pool._closed = True  # never hand out its connections again


def forget_pool() -> None:
    """Drop every loop's pool (after a database error: their connections are dead, or tests
    moving to another database): the next use opens a new one."""
    with _pools_lock:
        pools = [pool for _loop, pool in _pools.values()]
        _pools.clear()
        _opening.clear()
    for pool in pools:
        _hang_up(pool)


def _pool_of(loop: asyncio.AbstractEventLoop) -> psycopg_pool.AsyncConnectionPool | None:
    entry = _pools.get(id(loop))
    return entry[1] if entry is not None and entry[0] is loop else None


def _forget_closed_loops() -> None:
    with _pools_lock:
        closed = [key for key, (loop, _pool) in _pools.items() if loop.is_closed()]
        pools = [_pools.pop(key)[1] for key in closed]
        for key in closed:
            _opening.pop(key, None)
    for pool in pools:
        _hang_up(pool)


class _Database(channels_db.DatabaseLayer):
    async def get_db_pool(self, db_params: dict[str, typing.Any]) -> psycopg_pool.AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        if (pool := _pool_of(loop)) is not None:
            return pool
        _forget_closed_loops()
        with _pools_lock:
            opening = _opening.setdefault(id(loop), asyncio.Lock())
        async with opening:
            if (pool := _pool_of(loop)) is not None:  # opened while this one waited
                return pool
            pool = await self._open_pool(db_params)
            with _pools_lock:
                _pools[id(loop)] = (loop, pool)
            return pool

    async def _open_pool(self, db_params: dict[str, typing.Any]) -> psycopg_pool.AsyncConnectionPool:
        async def configure(conn: psycopg.AsyncConnection) -> None:
            await conn.set_autocommit(True)
            conn.prepare_threshold = 0
            conn.prepared_max = None

        # One connection kept per loop (a process has two long-lived ones), up to four in use.
        pool = psycopg_pool.AsyncConnectionPool(
            conninfo=psycopg.conninfo.make_conninfo(conninfo="", **db_params), open=False, configure=configure,
            **{"timeout": GETCONN_TIMEOUT_S, "min_size": 1, "max_size": 4, **self.psycopg_options},
        )
        try:
            await pool.open(wait=True, timeout=OPEN_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):
                await pool.close(timeout=0)
            raise
        return pool

    async def send_to_group(self, group_key: str, message: bytes, expire: int) -> None:
        """Queue ``message`` for every channel in the group: found and written by one statement.
        (The parent's ``group_send`` read the group twice, then inserted: three round trips, or two
        and a logged warning when nobody is in the group, which is most of the live pushes.)"""
        async with (await self.get_db_pool(db_params=self.db_params)).connection() as conn:
            await conn.execute(_SEND_TO_GROUP, (message, channels_db.utc_now() + timedelta(seconds=expire), group_key))


# Each inserted row's trigger (channels_postgres's migrations) NOTIFYs its channel's listener.
_SEND_TO_GROUP = sql.SQL(
    "INSERT INTO {messages} (channel, message, expire) "
    "SELECT DISTINCT channel, %s::bytea, %s::timestamptz FROM {groups} WHERE group_key = %s"
).format(messages=sql.Identifier(channels_db.MESSAGE_TABLE), groups=sql.Identifier(channels_db.GROUP_CHANNEL_TABLE))


class PostgresChannelLayer(_BaseLayer):
    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self.django_db = _Database(self.django_db.psycopg_options, self.db_params, logger=self.django_db.logger)

    async def _retrying(self, send: typing.Callable[..., typing.Awaitable[None]], *args: typing.Any) -> None:
        try:
            await send(*args)
        except _DB_ERRORS as exc:
            log.info("channel layer: %s; reconnecting", exc.__class__.__name__)
            forget_pool()
            await send(*args)

    async def send(self, channel: str, message: dict[str, typing.Any]) -> None:
        await self._retrying(super().send, channel, message)

    async def group_send(self, group: str, message: dict[str, typing.Any]) -> None:
        self.require_valid_group_name(group)  # raises TypeError, as the parent's check
        await self._retrying(self.django_db.send_to_group, self._group_key(group), self.serialize(message),
                             self.expiry)

    async def group_add(self, group: str, channel: str) -> None:
        await self._retrying(super().group_add, group, channel)

    async def listen_to_all_channels(self) -> None:
        delay, down_since = RELISTEN_FIRST_S, None
        while True:
            try:
                if down_since is not None:
                    await self._probe()  # raises while the database is still away
                    forget_pool()
                    log.info("channel layer: listening again after %.1f s",
                             asyncio.get_running_loop().time() - down_since)
                    delay, down_since = RELISTEN_FIRST_S, None
                # Reads the messages queued meanwhile, then LISTENs (and sets the running flag).
                await super().listen_to_all_channels()
                return  # an orderly shutdown
            except _DB_ERRORS as exc:
                if down_since is None:
                    down_since = asyncio.get_running_loop().time()
                    log.warning("channel layer: lost the LISTEN connection (%s); reconnecting with backoff",
                                exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELISTEN_CAP_S)

    async def _probe(self) -> None:
        conninfo = psycopg.conninfo.make_conninfo(conninfo="", **self.db_params)
        conn = await psycopg.AsyncConnection.connect(conninfo=conninfo, connect_timeout=OPEN_TIMEOUT_S)
        await conn.close()
