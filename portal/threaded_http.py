"""HTTP under ASGI without Django's async adaptation: each request runs Django's
synchronous handler, middleware and view in one hop onto a thread pool.

Django's ``ASGIHandler`` runs every request through ``sync_to_async`` for each
synchronous middleware hook and view, all thread-sensitive: one thread per
process runs them, one request after another, and the hops cost 20-30% of a
request's CPU. Here the request object is the same (``ASGIRequest``, so
``request.META`` and every response are exactly as before), but the whole
synchronous chain (``load_middleware(is_async=False)``, as under WSGI) runs in a
pool thread, several requests at once. Websockets stay with Channels; views
written as coroutines (the agents' long poll) still go through Django's own
ASGI handler, so a 20 s poll holds no pool thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import tempfile
import traceback
from functools import lru_cache

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestDataTooBig
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, ASGIRequest, get_script_prefix
from django.http import HttpResponse, HttpResponseBadRequest, HttpResponseServerError
from django.urls import Resolver404, get_resolver, set_script_prefix

logger = logging.getLogger("django.request")

# Pool threads per process: at most as many as the process's database connections.
DEFAULT_THREADS = 8


def threads_from_env() -> int:
    for name in ("WEB_THREADS", "DB_POOL_MAX_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return DEFAULT_THREADS


class _SyncHandler(base.BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.load_middleware(is_async=False)

    def handle_uncaught_exception(self, request, resolver, exc_info):
        # As ASGIHandler: a failing 500 handler still answers.
        try:
            return super().handle_uncaught_exception(request, resolver, exc_info)
        except Exception:
            return HttpResponseServerError(
                traceback.format_exc() if settings.DEBUG else "Internal Server Error", content_type="text/plain")


class ThreadedHTTP:
    """ASGI app for ``http`` scopes: Django's sync handler on a thread pool."""

    chunk_size = ASGIHandler.chunk_size

    def __init__(self, threads: int | None = None, async_app=None) -> None:
        self.handler = _SyncHandler()
        self.pool = concurrent.futures.ThreadPoolExecutor(threads or threads_from_env(), thread_name_prefix="http")
        # Coroutine views (and only they) keep Django's ASGI handler.
        self.async_app = async_app or ASGIHandler()

    @lru_cache(maxsize=4096)  # noqa: B019  (one instance per process, lives as long)
    def _is_async_view(self, path: str) -> bool:
        try:
            match = get_resolver().resolve(path)
        except Resolver404:
            return False
        return iscoroutinefunction(match.func)

    async def __call__(self, scope, receive, send):
        if self._is_async_view(scope["path"]):
            return await self.async_app(scope, receive, send)
        loop = asyncio.get_running_loop()
        with tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b") as body:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if "body" in message:
                    body.write(message["body"])
                if not message.get("more_body", False):
                    break
            body.seek(0)
            start, chunks, streaming = await loop.run_in_executor(self.pool, self._run, scope, body, loop, send)
        if streaming:
            return  # sent from the pool thread, chunk by chunk
        await send(start)
        for chunk in chunks:
            await send(chunk)

    def _run(self, scope, body, loop, send):
        """In a pool thread: the request through Django; the response's messages back
        (a streaming response is sent from here as it is produced)."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=ASGIHandler, scope=scope)
        try:
            request = ASGIRequest(scope, body)
        except UnicodeDecodeError:
            logger.warning("Bad Request (UnicodeDecodeError)", exc_info=sys.exc_info(), extra={"status_code": 400})
            response = HttpResponseBadRequest()
        except RequestDataTooBig:
            response = HttpResponse("413 Payload too large", status=413)
        else:
            response = self.handler.get_response(request)
            response._handler_class = ASGIHandler
        try:
            start = {"type": "http.response.start", "status": response.status_code,
                     "headers": self._headers(response)}
            if not response.streaming:
                return start, [{"type": "http.response.body", "body": chunk, "more_body": not last}
                               for chunk, last in ASGIHandler.chunk_bytes(response.content)], False
            self._send_from_thread(loop, send, start)
            for part in response:
                for chunk, _ in ASGIHandler.chunk_bytes(part):
                    self._send_from_thread(loop, send, {"type": "http.response.body", "body": chunk,
                                                        "more_body": True})
            self._send_from_thread(loop, send, {"type": "http.response.body"})
            return None, None, True
        finally:
            response.close()  # request_finished: the database connection goes back

    @staticmethod
    def _send_from_thread(loop, send, message) -> None:
        sent = asyncio.run_coroutine_threadsafe(send(message), loop)
        while True:
            try:
                return sent.result(timeout=1)
            except concurrent.futures.TimeoutError:
                if not loop.is_running():  # the server is stopping: do not hold its exit
                    sent.cancel()
                    raise ConnectionAbortedError("the server stopped while a response was streaming") from None

    @staticmethod
    def _headers(response) -> list[tuple[bytes, bytes]]:
        headers = []
        for header, value in response.items():
            if isinstance(header, str):
                header = header.encode("ascii")
            if isinstance(value, str):
                value = value.encode("latin1")
            headers.append((bytes(header), bytes(value)))
        for c in response.cookies.values():
            headers.append((b"Set-Cookie", c.output(header="").encode("ascii").strip()))
        return headers
