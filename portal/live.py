"""The one place that pushes live updates to websockets and agents.

Everything is sent after the surrounding transaction commits, so nobody sees a
decision that was rolled back. Consumers join groups named by the helpers below.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

STAFF_GROUP = "cluster"


def node_group(node_id: int) -> str:
    return f"node-{node_id}"


def tenant_group(tenant_id: int) -> str:
    return f"tenant-{tenant_id}"


def _send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        log.warning("no channel layer configured; dropped %s to %s", message.get("type"), group)
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:  # a push is best effort: the database already holds the truth
        log.exception("push of %s to %s failed", message.get("type"), group)


def send_on_commit(group: str, event_type: str, payload: dict[str, Any]) -> None:
    """Queue ``{"type": event_type, **payload}`` for ``group`` after commit."""
    message = {"type": event_type, **payload}
    transaction.on_commit(lambda: _send(group, message))
