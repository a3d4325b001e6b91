"""API and node tokens: a short lookup prefix plus an HMAC digest.

The full token is shown once, when it is made. The database keeps the prefix
(to find the row without scanning) and an HMAC-SHA256 of the whole token keyed
with ``TOKEN_PEPPER``; checks use ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings

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
