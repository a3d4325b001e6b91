"""Websocket consumers for live pages.

* ``/ws/cluster/`` (staff only): servers, GPUs, tasks, tenant usage, alerts.
* ``/ws/tasks/`` and ``/ws/tasks/<tenant slug>/`` (members): the tasks and usage
  of the user's tenants, never anyone else's.

Anonymous users and users without the right are refused at the handshake
(HTTP 403). Consumers receive high-level events from ``kernel.live`` (ids of
what changed) and format the current rows themselves, at most once per
``LIVE_MIN_INTERVAL_MS`` per viewer: a burst of events becomes one frame.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from kernel import live
from portal import livedata
from scheduling import logs
from scheduling.access import tasks_for
from scheduling.choices import TaskStatus
from scheduling.models import Task
from scheduling.reasons import translate_reason
from tenants.models import Membership, Tenant

MEMBERSHIP_RECHECK_S = 5.0


class _SharedQueries:
    """Viewers in one process asking for the same rows at the same time share one
    query: a result qualifies for a viewer if the query started after the last
    event that viewer received (so it reflects that commit)."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[float, asyncio.Future]] = {}

    async def get(self, key: Any, not_before: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
        entry = self._entries.get(key)
        if entry is not None and entry[0] >= not_before:
            return await asyncio.shield(entry[1])
        started = time.monotonic()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._entries[key] = (started, future)
        try:
            result = await fetch()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            if self._entries.get(key, (None, None))[1] is future:
                del self._entries[key]
            raise
        future.set_result(result)
        if len(self._entries) > 256:  # old keys are never reused; keep the map small
            for k in [k for k, (_, f) in self._entries.items() if f.done()][:128]:
                del self._entries[k]
        return result


shared = _SharedQueries()

# When this process first received each message (by ``mid``): the message was sent
# after its commit, so any query started after that moment sees the commit. Viewers
# that receive the same message a little later can then share the first one's query.
_first_seen: collections.OrderedDict[str, float] = collections.OrderedDict()


def _seen_at(event: dict[str, Any]) -> float:
    now = time.monotonic()
    mid = event.get("mid")
    if mid is None:
        return now
    at = _first_seen.setdefault(mid, now)
    if len(_first_seen) > 4096:
        _first_seen.popitem(last=False)
    return at


class CoalescingConsumer(AsyncJsonWebsocketConsumer):
    """Collects ids from events and flushes them as one frame per interval."""

    groups_to_join: list[str]

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        self.language = viewer_language(self.scope)
        self._dirty: dict[str, set[int]] = {}
        self._last_event = 0.0
        self._last_flush = 0.0
        self._flush_task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()
        groups = await self.authorize()
        if groups is None:
            await self.close(code=4403)
            return
        self.groups_to_join = groups
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.on_accepted()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "_flush_task", None) is not None:
            self._flush_task.cancel()
        for group in getattr(self, "groups_to_join", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Viewers only listen; a "ping" is answered so pages can check the socket.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    # --- subclasses -----------------------------------------------------------------
    async def authorize(self) -> list[str] | None:
        raise NotImplementedError

    async def on_accepted(self) -> None:
        pass

    async def render(self, dirty: dict[str, set[int]], not_before: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    # --- coalescing -------------------------------------------------------------------
    def mark(self, kind: str, ids: list[int], seen_at: float | None = None) -> None:
        self._dirty.setdefault(kind, set()).update(ids)
        self._last_event = max(self._last_event, time.monotonic() if seen_at is None else seen_at)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        interval = settings.LIVE_MIN_INTERVAL_MS / 1000
        wait = self._last_flush + interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        async with self._flush_lock:
            dirty, self._dirty = self._dirty, {}
            not_before, self._last_event = self._last_event, 0.0
            self._flush_task = None  # events from now on schedule the next frame
            self._last_flush = time.monotonic()
            if not dirty:
                return
            for frame in await self.render(dirty, not_before):
                await self.send_json(frame)

    def duplicate(self, event: dict[str, Any]) -> bool:
        """True for a second copy of a message already handled (same ``mid``)."""
        mid = event.get("mid")
        if mid is None:
            return False
        seen = self.__dict__.setdefault("_seen_mids", collections.deque(maxlen=256))
        if mid in seen:
            return True
        seen.append(mid)
        return False

    # --- events from kernel.live -----------------------------------------------------------
    async def gpus_changed(self, event: dict[str, Any]) -> None:
        if not self.duplicate(event):
            self.mark("nodes", event.get("node_ids", []), _seen_at(event))

    async def tasks_changed(self, event: dict[str, Any]) -> None:
        if not self.duplicate(event):
            self.mark("tasks", event.get("task_ids", []), _seen_at(event))

    async def alert_raised(self, event: dict[str, Any]) -> None:
        pass


async def _gpus_and_nodes(node_ids: set[int], not_before: float) -> dict[str, Any]:
    key = ("gpus", frozenset(node_ids))

    @database_sync_to_async
    def fetch() -> dict[str, Any]:
        return {"type": "gpus", "nodes": livedata.node_rows(node_ids), "gpus": livedata.gpu_rows(node_ids)}

    return await shared.get(key, not_before, fetch)


async def _tasks(task_ids: set[int], not_before: float) -> list[dict[str, Any]]:
    return await shared.get(("tasks", frozenset(task_ids)), not_before,
                            database_sync_to_async(lambda: livedata.task_rows(task_ids)))


async def _usage(tenant_ids: set[int], not_before: float) -> list[dict[str, Any]]:
    return await shared.get(("usage", frozenset(tenant_ids)), not_before,
                            database_sync_to_async(lambda: livedata.tenant_usage_rows(tenant_ids)))


def viewer_language(scope: dict[str, Any]) -> str:
    """The language a page was rendered in: the switch's cookie, else the browser's
    Accept-Language (as LocaleMiddleware decides for the page itself)."""
    from django.utils import translation
    from django.utils.translation.trans_real import parse_accept_lang_header

    cookies = scope.get("cookies") or {}
    wanted = [cookies.get(settings.LANGUAGE_COOKIE_NAME, "")]
    headers = dict(scope.get("headers") or [])
    wanted += [lang for lang, _q in parse_accept_lang_header(headers.get(b"accept-language", b"").decode("latin-1"))]
    for code in wanted:
        if code and code != "*":
            try:
                return translation.get_supported_language_variant(code)
            except LookupError:
                continue
    return settings.LANGUAGE_CODE


def localised(tasks: list[dict[str, Any]], language: str) -> list[dict[str, Any]]:
    """Task rows as this viewer reads them: labels and reasons in their language (the
    rows themselves are shared between viewers, so each gets a translated copy)."""
    if language == settings.LANGUAGE_CODE:
        return tasks
    from django.utils import translation


    with translation.override(language):
        return [{**t, "status_label": str(TaskStatus(t["status"]).label),
                 "pending_reason": translate_reason(t.get("pending_reason") or ""),
                 "failure_reason": translate_reason(t.get("failure_reason") or "")} for t in tasks]


class ClusterConsumer(CoalescingConsumer):
    """The operators' console: every server, GPU and task. Staff only."""

    async def authorize(self) -> list[str] | None:
        user = self.user
        if user is None or not user.is_authenticated or not (user.is_active and user.is_staff):
            return None
        return [live.STAFF_GROUP]

    async def on_accepted(self) -> None:
        # A full picture first, so a page rendered a moment ago misses nothing.
        rows = await database_sync_to_async(
            lambda: {"type": "gpus", "full": True, "nodes": livedata.node_rows(), "gpus": livedata.gpu_rows()}
        )()
        await self.send_json(rows)

    async def render(self, dirty: dict[str, set[int]], not_before: float) -> list[dict[str, Any]]:
        frames = []
        if dirty.get("nodes"):
            frames.append(await _gpus_and_nodes(dirty["nodes"], not_before))
        if dirty.get("tasks"):
            tasks = await _tasks(dirty["tasks"], not_before)
            frames.append({"type": "tasks", "tasks": localised(tasks, self.language)})
            tenants = {t["tenant_id"] for t in tasks}
            if tenants:
                frames.append({"type": "usage", "tenants": await _usage(tenants, not_before)})
        return frames

    async def alert_raised(self, event: dict[str, Any]) -> None:
        if not self.duplicate(event):
            await self.send_json({"type": "alert", "alert": event.get("alert", {})})


class TenantTasksConsumer(CoalescingConsumer):
    """A portal user's view of their tenants' tasks (one tenant when the URL names it)."""

    async def authorize(self) -> list[str] | None:
        user = self.user
        if user is None or not user.is_authenticated or not user.is_active:
            return None
        slug = self.scope["url_route"]["kwargs"].get("tenant")
        self._checked_at = time.monotonic()
        self.all_tenants = slug is None and user.is_staff
        if self.all_tenants:  # operators on the portal pages see every tenant's tasks
            self.tenant_ids = set()
            return [live.STAFF_GROUP]
        self.tenant_ids = await self._allowed_tenants(slug)
        if not self.tenant_ids:
            return None
        return [live.tenant_group(t) for t in sorted(self.tenant_ids)]

    @database_sync_to_async
    def _allowed_tenants(self, slug: str | None = None) -> set[int]:
        mine = Membership.objects.filter(user=self.user)
        if slug is not None:
            mine = mine.filter(tenant__slug=slug)
        ids = set(mine.values_list("tenant_id", flat=True))
        if slug is not None and not ids and self.user.is_staff:
            ids = set(Tenant.objects.filter(slug=slug).values_list("pk", flat=True))
        return ids

    async def render(self, dirty: dict[str, set[int]], not_before: float) -> list[dict[str, Any]]:
        if not self.all_tenants and time.monotonic() - self._checked_at > MEMBERSHIP_RECHECK_S:
            # A membership removed while connected stops the feed within seconds.
            slug = self.scope["url_route"]["kwargs"].get("tenant")
            self.tenant_ids &= await self._allowed_tenants(slug)
            self._checked_at = time.monotonic()
            if not self.tenant_ids:
                await self.close(code=4403)
                return []
        if not dirty.get("tasks"):
            return []
        tasks = [t for t in await _tasks(dirty["tasks"], not_before)
                 if self.all_tenants or t["tenant_id"] in self.tenant_ids]
        if not tasks:
            return []
        tenants = {t["tenant_id"] for t in tasks}
        return [{"type": "tasks", "tasks": localised(tasks, self.language)},
                {"type": "usage", "tenants": await _usage(tenants, not_before)}]



class TaskLogConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/tasks/<id>/log/?attempt=A&offset=N&rank=R``: one task's output as it is stored
    (a gang's rank ``R``, the server the page's selector chose; 0 by default).

    Opens at the newest lines (the page rendered up to ``offset`` of ``attempt``; without
    them the last ``logs.VIEW_TAIL_LINES`` lines come first), then sends each increment:
    ``{"type": "log", "attempt", "offset", "data", "final", "reset"}``. When the task is
    requeued, the new attempt's log starts over with ``reset: true``. Only users who see
    the task (``scheduling.access.tasks_for``) get a socket.
    """

    async def connect(self) -> None:
        from urllib.parse import parse_qs

        user = self.scope.get("user")
        self.task_id = int(self.scope["url_route"]["kwargs"]["task_id"])
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task | None = None
        if user is None or not user.is_authenticated or not user.is_active or not await self._visible(user):
            await self.close(code=4403)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        raw_rank = (query.get("rank") or ["0"])[0]
        self.rank = int(raw_rank) if raw_rank.isascii() and raw_rank.isdigit() and len(raw_rank) < 5 else 0
        try:
            self.attempt: int | None = int(query["attempt"][0])
            self.offset: int | None = max(int(query["offset"][0]), 0)
        except (KeyError, ValueError, IndexError):
            self.attempt = self.offset = None
        await self.channel_layer.group_add(live.task_log_group(self.task_id), self.channel_name)
        await self.accept()
        await self._send_new()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "_pending", None) is not None:
            self._pending.cancel()
        if hasattr(self, "attempt"):
            await self.channel_layer.group_discard(live.task_log_group(self.task_id), self.channel_name)

    @database_sync_to_async
    def _visible(self, user) -> bool:

        return tasks_for(user).filter(pk=self.task_id).exists()

    @database_sync_to_async
    def _read(self) -> list[dict[str, Any]]:

        task = Task.objects.only("attempt", "status").get(pk=self.task_id)
        frames = []
        if self.offset is None or self.attempt is None:
            page = logs.tail(task, logs.VIEW_TAIL_LINES, rank=self.rank)
            frames.append({"reset": True, **vars(page)})
        elif self.attempt != task.attempt:
            # Requeued: the new attempt writes a new log from its start.
            page = logs.read_from(task, 0, rank=self.rank)
            frames.append({"reset": True, **vars(page)})
        else:
            page = logs.read_from(task, self.offset, rank=self.rank)
            frames.append({"reset": False, **vars(page)})
        while page.data and page.next_offset > page.offset and len(frames) < 8:
            # Large bursts come in several pages; the rest follows with the next event.
            more = logs.read_from(task, page.next_offset, page.attempt, rank=self.rank)
            if not more.data:
                break
            frames.append({"reset": False, **vars(more)})
            page = more
        self.attempt, self.offset = page.attempt, page.next_offset
        return [f for f in frames if f["data"] or f["reset"] or f["final"]]

    async def _send_new(self) -> None:
        async with self._lock:
            for frame in await self._read():
                await self.send_json({"type": "log", **{k: frame[k] for k in
                                                        ("attempt", "offset", "data", "final", "reset")}})

    async def log_appended(self, event: dict[str, Any]) -> None:
        # Coalesce: chunks arriving faster than the live interval become one read.
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._after_interval())

    async def _after_interval(self) -> None:
        await asyncio.sleep(settings.LIVE_MIN_INTERVAL_MS / 1000)
        self._pending = None  # an event from now on schedules another read (the lock orders them)
        await self._send_new()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})
