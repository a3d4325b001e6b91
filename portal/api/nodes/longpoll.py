"""``GET /api/agent/v1/assignments``: the desired state, as a long poll.

The fallback when an agent's websocket is down. ``?known=<etag>&wait=<s>`` holds
the request until the server's set of tasks differs from ``known`` or ``wait``
seconds pass (at most 30), re-checking every 250 ms. An async view, so a waiting
agent holds no worker thread between its (short) checks.
"""

from __future__ import annotations

import asyncio
import time

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse

from nodes.enrolment import node_for_token
from portal.api.nodes.auth import AgentRateThrottle, token_from_header
from scheduling import assignments

MAX_WAIT_S = 30.0
RECHECK_S = 0.25


def _db(func):
    # The one thread Django uses for sync work in this request: the request's own
    # connection, closed or kept by Django's request signals like any other view's.
    return sync_to_async(func)


class _ThrottleRequest:
    """What the DRF throttle reads from a request."""

    def __init__(self, request: HttpRequest, node) -> None:
        self.auth, self.META = node, request.META


async def assignments_view(request: HttpRequest) -> JsonResponse:
    if request.method != "GET":
        return JsonResponse({"detail": f'method "{request.method}" not allowed'}, status=405)
    token = token_from_header(request.headers.get("Authorization"))
    node = await _db(node_for_token)(token) if token else None
    if node is None:
        return JsonResponse({"detail": "invalid node token"}, status=401, headers={"WWW-Authenticate": "Node"})
    throttle = AgentRateThrottle()
    if not throttle.allow_request(_ThrottleRequest(request, node), None):
        return JsonResponse({"detail": "request was throttled"}, status=429,
                            headers={"Retry-After": str(int(throttle.wait() or 1))})
    try:
        wait = float(request.GET.get("wait", "0"))
    except ValueError:
        return JsonResponse({"wait": ["a number of seconds (0 to 30)"]}, status=400)
    if not 0 <= wait <= MAX_WAIT_S:
        return JsonResponse({"wait": ["a number of seconds (0 to 30)"]}, status=400)
    known = request.GET.get("known", "")
    deadline = time.monotonic() + wait
    while known and time.monotonic() < deadline:
        if await _db(assignments.current_etag)(node.pk) != known:
            break
        await asyncio.sleep(min(RECHECK_S, max(deadline - time.monotonic(), 0)))
    state = await _db(assignments.desired_state)(node.pk)
    return JsonResponse(state)
