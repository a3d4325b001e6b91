"""Enrolment: join tokens in, node tokens out.

A join token is either bound to one server (made in the admin, used once) or
cluster-wide (``JoinToken.node`` empty: any agent holding it may register a *new*
server under its own name until the token expires or is revoked). Redeeming one
gives the agent a node token; the portal keeps only its prefix and HMAC.

A cluster token never takes over a server that is already enrolled: whoever holds
it could otherwise re-enrol any server by name and receive its tasks (their
commands and env). An existing server enrols again only with a one-time token
made for it in the admin, or after an operator revoked its node token there
(``allow_reenrolment``), which the next enrolment by name then uses up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from kernel import tokens
from nodes.models import JoinToken, Node, NodeStatus


class EnrolmentError(Exception):
    """The join token is unknown, used, revoked or expired (one readable line)."""


@dataclass(frozen=True)
class Enrolled:
    node: Node
    node_token: str
    created: bool


def issue_join_token(node: Node | None = None, *, note: str = "", ttl: timedelta | None = None) -> str:
    """Make a join token (bound to ``node``, or cluster-wide) and return its secret, shown once."""
    new = tokens.make_token("join")
    JoinToken.objects.create(
        node=node, prefix=new.prefix, digest=new.digest, note=note[:200],
        expires_at=timezone.now() + ttl if ttl else None,
    )
    return new.token


def find_join_token(secret: str) -> JoinToken | None:
    """The usable join token for ``secret``, or None (unknown, revoked, expired or used)."""
    row = JoinToken.objects.filter(prefix=tokens.prefix_of(secret)).first()
    if row is None or not tokens.matches(secret, row.digest) or row.revoked:
        return None
    if row.expires_at is not None and row.expires_at <= timezone.now():
        return None
    if row.node_id is not None and row.used_at is not None:
        return None
    return row


def redeem(secret: str, *, name: str, hostname: str = "", agent_version: str = "") -> Enrolled:
    """Exchange a join token for a node token.

    A server-bound token enrols that server whatever name the agent asked for, and
    is spent. A cluster token registers (or re-enrols) the server called ``name``;
    re-enrolling replaces the node token, so an agent that lost its token file can
    come back under the same name.
    """
    with transaction.atomic():
        row = JoinToken.objects.select_for_update().filter(prefix=tokens.prefix_of(secret)).first()
        if row is None or find_join_token(secret) is None:
            raise EnrolmentError("join token is unknown, revoked, expired or already used")
        created = False
        if row.node_id is not None:
            node = Node.objects.select_for_update().get(pk=row.node_id)
            row.used_at = timezone.now()
            row.save(update_fields=["used_at"])
        else:
            node, created = Node.objects.select_for_update().get_or_create(
                name=name, defaults={"hostname": hostname, "status": NodeStatus.OFFLINE,
                                     "status_reason": "registered; waiting for the first heartbeat"},
            )
            if not created and node.token_prefix is not None:
                raise EnrolmentError(
                    f"server {name} is already enrolled: a cluster join token cannot enrol it again; an operator "
                    "must make a one-time join token for it (or allow its re-enrolment) in the admin")
        if hostname:
            node.hostname = hostname
        if agent_version:
            node.agent_version = agent_version[:50]
        node.save(update_fields=["hostname", "agent_version", "updated_at"])
        return Enrolled(node=node, node_token=node.issue_token(), created=created)


def allow_reenrolment(node: Node) -> None:
    """An operator's approval: the server's node token stops working at once, and the
    next agent to enrol by its name with a cluster join token takes it over."""
    Node.objects.filter(pk=node.pk).update(token_prefix=None, token_digest="", updated_at=timezone.now())


def node_for_token(secret: str) -> Node | None:
    """The server a node token belongs to, or None."""
    if not secret.startswith("node_"):
        return None
    node = Node.objects.filter(token_prefix=tokens.prefix_of(secret)).first()
    if node is None or not tokens.matches(secret, node.token_digest):
        return None
    return node
