"""Node-token authentication and per-server throttling for the agent API.

Agents send ``Authorization: Node <token>``. The authenticated principal is the
server itself (``request.auth`` is the ``Node``), so every view acts only for
the server the token belongs to: there is no server id in any URL or payload to
forge.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from rest_framework import authentication, exceptions, permissions, throttling

from kernel import tokens
from nodes.enrolment import node_for_token
from nodes.models import Node

KEYWORD = "Node"
# Node tokens verified by this process, valid until the server's token or name changes (kernel.tokens).
verified = tokens.VerifiedTokens()


@dataclass(frozen=True)
class AgentPrincipal:
    """Stands in for ``request.user``: an agent is not a Django user."""

    node_id: int
    name: str
    is_authenticated: bool = True
    is_staff: bool = False
    is_active: bool = True

    def __str__(self) -> str:
        return f"agent:{self.name}"


def token_from_header(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not value:
        return None
    keyword, _, token = value.strip().partition(" ")
    if keyword != KEYWORD or not token.strip():
        return None
    return token.strip()


class NodeTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header or not header.startswith(KEYWORD + " "):
            return None
        token = token_from_header(header)
        if not token:
            raise exceptions.AuthenticationFailed("invalid node token")
        generation = tokens.credentials_generation()  # read before the row: see VerifiedTokens
        token_digest = tokens.digest(token)
        node = verified.get(token_digest, generation)
        if node is None:
            node = node_for_token(token)
            if node is None:
                raise exceptions.AuthenticationFailed("invalid node token")
            verified.put(token_digest, generation, node)
        return AgentPrincipal(node_id=node.pk, name=node.name), node

    def authenticate_header(self, request) -> str:
        return KEYWORD


class IsAgent(permissions.BasePermission):
    message = "a node token is required (Authorization: Node <token>)"

    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, Node)


class AgentRateThrottle(throttling.SimpleRateThrottle):
    """Per server (per client address for registration). Per web process: the
    default cache is process-local, so N web nodes allow N times the rate."""

    scope = "agent"
    rate = getattr(settings, "AGENT_API_THROTTLE_RATE", "1200/min")

    def get_cache_key(self, request, view) -> str:
        ident = f"node-{request.auth.pk}" if isinstance(request.auth, Node) else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class RegisterRateThrottle(AgentRateThrottle):
    scope = "agent-register"
    rate = getattr(settings, "AGENT_REGISTER_THROTTLE_RATE", "60/min")
