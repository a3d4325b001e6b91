"""API token authentication for the users' REST API.

``Authorization: Token api_...`` (or ``Bearer api_...``). Tokens are looked up
by their prefix and checked against the stored HMAC (``kernel.tokens``); a
disabled, expired or unknown token is refused with 401. Agents' node tokens
(``node_...``) belong to the agent API only and are refused here.
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from kernel import tokens
from kernel.prepared import prepared_cursor
from portal import audit
from tenants.models import ApiToken

KEYWORDS = (b"token", b"bearer")
# last_used_at is written at most this often per token: a busy client must not
# turn every request into an UPDATE.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Tokens verified by this process, valid until anything about them changes (kernel.tokens).
verified = tokens.VerifiedTokens()


def _current_state(token_pk: int) -> tuple[int | None, object]:
    """The credentials generation and the token's stored last_used_at, in one statement."""
    with prepared_cursor() as cursor:  # every API request
        cursor.execute("SELECT g.value, t.last_used_at FROM portal_credentials_generation g "
                       "LEFT JOIN tenants_apitoken t ON t.id = %s WHERE g.id = 1", [token_pk])
        found = cursor.fetchone()
    return (found[0], found[1]) if found else (None, None)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() not in KEYWORDS:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header: expected 'Token <api token>'.")
        try:
            token = header[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Malformed token.") from None
        kind = token.partition("_")[0]
        if kind != "api":
            if kind in ("node", "join"):
                raise exceptions.AuthenticationFailed("Agent tokens cannot use the users' API.")
            raise exceptions.AuthenticationFailed("Invalid token.")
        token_digest = tokens.digest(token)
        row = verified.peek(token_digest)
        if row is not None:
            # One read: is the cached row still current, and when was it last used (written
            # by any process)?
            generation, row_last_used = _current_state(row.pk)
            if verified.get(token_digest, generation) is row:
                row.last_used_at = row_last_used
            else:
                row = None
        else:
            generation = tokens.credentials_generation()  # read before the row: see VerifiedTokens
        if row is None:
            row = ApiToken.objects.select_related("user").filter(prefix=tokens.prefix_of(token)).first()
            if row is None or not hmac.compare_digest(token_digest, row.digest):
                raise exceptions.AuthenticationFailed("Invalid token.")
            if row.enabled and row.user.is_active:
                verified.put(token_digest, generation, row)
        now = timezone.now()
        if not row.enabled:
            raise exceptions.AuthenticationFailed("This token was revoked.")
        if row.expires_at is not None and row.expires_at <= now:
            raise exceptions.AuthenticationFailed("This token has expired.")
        if not row.user.is_active:
            raise exceptions.AuthenticationFailed("This user is disabled.")
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=row.pk).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
            ).update(last_used_at=now)
        audit.note_api_user(row.user)
        return row.user, row

    def authenticate_header(self, request) -> str:
        return self.keyword


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "portal.api.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`Token api_...` (create one on the portal's Tokens page)"}


def create_token(user, name: str, expires_at=None) -> tuple[ApiToken, str]:
    """Make a token for ``user``; returns the row and the secret (shown once)."""
    new = tokens.make_token("api")
    row = ApiToken.objects.create(user=user, name=name, prefix=new.prefix, digest=new.digest, expires_at=expires_at)
    return row, new.token
