"""API and node tokens: a short lookup prefix plus an HMAC digest.

The full token is shown once, when it is made. The database keeps the prefix
(to find the row without scanning) and an HMAC-SHA256 of the whole token keyed
with ``TOKEN_PEPPER``; checks use ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from kernel.prepared import prepared_cursor

PREFIX_LEN = 10


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once, never stored
    prefix: str
    digest: str


def digest(token: str) -> str:
    pepper = (getattr(settings, "TOKEN_PEPPER", None) or settings.SECRET_KEY).encode()
    return hmac.new(pepper, token.encode(), hashlib.sha256).hexdigest()


def make_token(kind: str) -> NewToken:
    """``kind`` is a short readable tag ("node", "join", "api") that starts the token."""
    body = secrets.token_urlsafe(32)
    token = f"{kind}_{body}"
    return NewToken(token=token, prefix=token[: len(kind) + 1 + PREFIX_LEN], digest=digest(token))


def prefix_of(token: str) -> str:
    kind, _, body = token.partition("_")
    return f"{kind}_{body[:PREFIX_LEN]}"


def matches(token: str, stored_digest: str) -> bool:
    return bool(stored_digest) and hmac.compare_digest(digest(token), stored_digest)


def credentials_generation() -> int | None:
    """The current credentials generation (migration ``portal.0004``), or None if unknown.

    Read in the caller's transaction, so a revocation it made itself counts at once.
    """
    with prepared_cursor() as cursor:  # every agent request
        cursor.execute("SELECT value FROM portal_credentials_generation WHERE id = 1")
        row = cursor.fetchone()
    return row[0] if row else None


class VerifiedTokens:
    """Tokens this process verified recently, each with what it stands for (a token
    row and its user, or a server).

    An entry is used only while the credentials generation it was verified under is
    still the current one and it is younger than ``ttl_s``: anything that could
    make a token invalid (revoked, expired, deleted, re-issued, its user disabled or
    changed) moves the generation in the same transaction, so the next request in
    any process reloads it. Per request that leaves one one-row read instead of the
    token lookup, the user load and the HMAC. Failures are never cached. Cached
    objects are shared by the process's threads: read them, don't change them.
    Keys are the tokens' HMAC digests, so no secret is kept in memory.
    """

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[int, float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, token_digest: str, generation: int | None) -> Any | None:
        entry = self._entries.get(token_digest)
        if entry is None or generation is None or entry[0] != generation:
            return None
        if time.monotonic() - entry[1] >= self.ttl_s:
            return None
        return entry[2]

    def peek(self, token_digest: str) -> Any | None:
        """The entry's value whatever its generation (check it with ``get`` before use)."""
        entry = self._entries.get(token_digest)
        if entry is None or time.monotonic() - entry[1] >= self.ttl_s:
            return None
        return entry[2]

    def put(self, token_digest: str, generation: int | None, value: Any) -> None:
        if generation is None:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_digest] = (generation, time.monotonic(), value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
