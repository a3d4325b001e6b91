"""The one place that pushes live updates to websockets and agents.

Everything is sent after the surrounding transaction commits, so nobody sees a
decision that was rolled back. Pushes are coalesced at two levels:

* here, per transaction: every call inside one transaction merges into one
  outbox, which sends one message per (group, event type) after commit, with
  the union of the ids (a scheduler pass that places 500 tasks sends one
  ``tasks.changed`` per tenant, not 500), all in one event loop;
* in the consumers (``portal.consumers``), per viewer: events arriving closer
  together than ``LIVE_MIN_INTERVAL_S`` are merged into one screen update.

In server processes (``LIVE_PUBLISH_IN_BACKGROUND``, on by default) a committed
outbox is handed to this process's publisher thread instead of being sent from
the request thread: the request answers without waiting for the channel layer,
and outboxes committed while the publisher is busy are merged into one batch
(id lists united per group and type), sent in one long-lived event loop (so the
layer's connections are reused). After a send the publisher waits until
``LIVE_PUBLISH_MIN_INTERVAL_MS`` has passed since that send began before it sends
again: a push after a quiet spell leaves at once, and under a stream of commits
(hundreds of submits a second) each group gets at most one merged message per
interval instead of one per commit. An urgent message (an agent's assignments:
it is on the path from submit to a running process) takes its batch out at once.
An outbox reaches the publisher only from its commit hook, so a rolled-back
change is never published. Pending pushes are flushed when the process exits.

Consumers join the groups named by the helpers below and receive high-level
events (ids of what changed) that they format themselves from the database.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

STAFF_GROUP = "cluster"


def node_group(node_id: int) -> str:
    """The agent of one GPU server listens here."""
    return f"node-{node_id}"


def tenant_group(tenant_id: int) -> str:
    """Portal users of one tenant listen here."""
    return f"tenant-{tenant_id}"


def task_log_group(task_id: int) -> str:
    """Viewers of one task's live log listen here."""
    return f"task-log-{task_id}"


def _stamp(message: dict[str, Any]) -> dict[str, Any]:
    """A message id, so a consumer can drop a copy delivered twice (channels_postgres
    can run two LISTEN connections in one process for a moment and deliver both)."""
    return {**message, "mid": uuid.uuid4().hex[:16]}


def _send(group: str, message: dict[str, Any]) -> None:
    message = _stamp(message)
    layer = get_channel_layer()
    if layer is None:
        log.warning("no channel layer configured; dropped %s to %s", message.get("type"), group)
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:  # a push is best effort: the database already holds the truth
        log.exception("push of %s to %s failed", message.get("type"), group)


def _send_all(messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Send several messages in one event loop (one ``async_to_sync`` per message
    costs a thread each: ~2 ms, 7x slower for a pass that touches 200 servers)."""
    if len(messages) == 1:
        _send(*messages[0])
        return
    layer = get_channel_layer()
    if layer is None:
        log.warning("no channel layer configured; dropped %d messages", len(messages))
        return

    try:
        async_to_sync(_send_messages)(layer, messages)
    except Exception:
        log.exception("push of %d messages failed", len(messages))


async def _send_messages(layer, messages: list[tuple[str, dict[str, Any]]]) -> None:
    for group, message in ((g, _stamp(m)) for g, m in messages):
        try:
            await layer.group_send(group, message)
        except Exception:  # best effort, as in _send
            log.exception("push of %s to %s failed", message.get("type"), group)


class _Outbox:
    """What one transaction will push after it commits, merged by (group, type).

    Registered once per transaction (and savepoint level) with ``on_commit``; it
    lives in Django's list of commit hooks, so a rolled-back savepoint or
    transaction discards it together with everything merged into it. After
    commit its messages leave together, in first-queued order.
    """

    def __init__(self) -> None:
        # (group, type) -> ("ids", key, set of ids) | ("plain", payload); dicts keep insertion order
        self.entries: dict[tuple[str, str], tuple[str, Any, Any]] = {}
        self.sent = False
        self.urgent = False  # holds an urgent message: the publisher sends it without waiting

    def add_ids(self, group: str, event_type: str, key: str, ids: Iterable[int]) -> None:
        entry = self.entries.get((group, event_type))
        if entry is None or entry[0] != "ids":
            entry = self.entries[(group, event_type)] = ("ids", key, set())
        entry[2].update(ids)

    def add_plain(self, group: str, event_type: str, payload: dict[str, Any], urgent: bool = False) -> None:
        self.entries[(group, event_type)] = ("plain", payload, None)
        self.urgent = self.urgent or urgent

    def merge(self, other: _Outbox) -> None:
        """Take in another (committed) outbox: id lists are united; a plain payload
        (e.g. an alert) is kept as its own message, never overwritten by another
        transaction's."""
        self.urgent = self.urgent or other.urgent
        for (group, event_type), (kind, a, b) in other.entries.items():
            if kind == "ids":
                self.add_ids(group, event_type, a, b)
            else:
                self.entries[(group, event_type, len(self.entries))] = (kind, a, b)

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for (group, event_type, *_), (kind, a, b) in self.entries.items():
            out.append((group, {"type": event_type, a: sorted(b)} if kind == "ids" else {"type": event_type, **a}))
        return out

    def __call__(self) -> None:
        self.sent = True
        if settings.LIVE_PUBLISH_IN_BACKGROUND:
            publisher.publish(self)
        else:
            _send_all(self.messages())


class _Publisher:
    """This process's one sender of committed outboxes (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: _Outbox | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    def publish(self, box: _Outbox) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                # First use in this process (or a forked child, which has no thread).
                self._pending, self._busy, self._pid = None, False, os.getpid()
                self._thread = threading.Thread(target=self._run, name="live-publisher", daemon=True)
                self._thread.start()
            if self._pending is None:
                self._pending = _Outbox()
            self._pending.merge(box)
            self._wake.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over so far has been sent; False on timeout."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                return True
            return self._wake.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()  # lives as long as the thread: the layer's connections stay open
        last_send = -float("inf")
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._pending is not None)
                # Commits arriving meanwhile merge into the pending batch.
                while not self._pending.urgent and (
                        delay := last_send + settings.LIVE_PUBLISH_MIN_INTERVAL_MS / 1000 - time.monotonic()) > 0:
                    self._wake.wait(delay)
                box, self._pending, self._busy = self._pending, None, True
            last_send = time.monotonic()
            try:
                layer = get_channel_layer()
                if layer is None:
                    log.warning("no channel layer configured; dropped %d messages", len(box.entries))
                else:
                    loop.run_until_complete(_send_messages(layer, box.messages()))
            except Exception:
                log.exception("push of %d messages failed", len(box.entries))
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()


publisher = _Publisher()
atexit.register(publisher.flush)


def _outbox() -> _Outbox | None:
    """The current transaction's outbox (made on first use), or None in autocommit."""
    conn = transaction.get_connection()
    if not conn.in_atomic_block:
        return None
    # One outbox per savepoint level, so a rolled-back savepoint takes exactly its
    # own changes with it (the common case, one level, is one outbox).
    level = set(conn.savepoint_ids)
    for sids, func, _robust in reversed(conn.run_on_commit):
        if isinstance(func, _Outbox) and not func.sent and sids == level:
            return func
    box = _Outbox()
    transaction.on_commit(box, robust=True)
    return box


def _push_ids(group: str, event_type: str, key: str, ids: Iterable[int]) -> None:
    ids = sorted(set(ids))
    if not ids:
        return
    box = _outbox()
    if box is None:
        box = _Outbox()
        box.add_ids(group, event_type, key, ids)
        box()
    else:
        box.add_ids(group, event_type, key, ids)


def send_on_commit(group: str, event_type: str, payload: dict[str, Any], *, urgent: bool = False) -> None:
    """Queue ``{"type": event_type, **payload}`` for ``group`` after commit.

    Within one transaction a later payload for the same group and type replaces
    an earlier one; use the helpers below for id lists, which are merged.
    ``urgent``: sent without waiting out the publisher's interval.
    """
    box = _outbox()
    if box is None:
        box = _Outbox()
        box.add_plain(group, event_type, payload, urgent)
        box()
    else:
        box.add_plain(group, event_type, payload, urgent)


def assignments_changed(node_ids: Iterable[int]) -> None:
    """Tell agents their set of tasks changed (new placement, cancel, timeout)."""
    for node_id in sorted(set(node_ids)):
        send_on_commit(node_group(node_id), "assignments.changed", {"node_id": node_id}, urgent=True)


def tasks_changed(tasks: Iterable[tuple[int, int]]) -> None:
    """``(tenant_id, task_id)`` pairs whose state changed: one message per tenant, plus staff."""
    by_tenant: dict[int, set[int]] = {}
    for tenant_id, task_id in tasks:
        by_tenant.setdefault(tenant_id, set()).add(task_id)
    for tenant_id, ids in by_tenant.items():
        _push_ids(tenant_group(tenant_id), "tasks.changed", "task_ids", ids)
    _push_ids(STAFF_GROUP, "tasks.changed", "task_ids", (i for ids in by_tenant.values() for i in ids))


def gpus_changed(node_ids: Iterable[int]) -> None:
    """GPU metrics or state of these servers changed (heartbeat, cordon, allocation)."""
    _push_ids(STAFF_GROUP, "gpus.changed", "node_ids", node_ids)


def log_appended(task_id: int) -> None:
    """New output of a task was stored: its log viewers read on from where they are."""
    _push_ids(task_log_group(task_id), "log.appended", "task_ids", [task_id])
