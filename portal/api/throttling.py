"""Per-token rate limit: a token bucket per API token (per session user for the
browser), kept in process memory.

``API_RATE_LIMIT`` requests per second refill the bucket, up to ``API_RATE_BURST``.
Each web process keeps its own buckets, so N web nodes behind a load balancer
allow up to N times the rate; that bounds a runaway script without a shared
store on the hot path. A batch submit counts as one request.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from rest_framework.throttling import BaseThrottle

_MAX_KEYS = 100_000


class TokenBucketThrottle(BaseThrottle):
    _lock = threading.Lock()
    _buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, time.monotonic() of last refill)

    def __init__(self) -> None:
        self.rate = float(settings.API_RATE_LIMIT)
        self.burst = float(settings.API_RATE_BURST)
        self._wait = 0.0

    @staticmethod
    def key(request) -> str | None:
        auth = getattr(request, "auth", None)
        if auth is not None and hasattr(auth, "prefix"):
            return f"token:{auth.prefix}"
        if request.user and request.user.is_authenticated:
            return f"user:{request.user.pk}"
        return None  # anonymous requests are refused by authentication, or are the health check

    def allow_request(self, request, view) -> bool:
        if self.rate <= 0:
            return True
        key = self.key(request)
        if key is None:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                if len(self._buckets) >= _MAX_KEYS:
                    self._buckets.clear()
                self._buckets[key] = (tokens - 1.0, now)
                return True
            self._buckets[key] = (tokens, now)
            self._wait = (1.0 - tokens) / self.rate
            return False

    def wait(self) -> float:
        return self._wait
