"""The agent's websocket (``/ws/agent/v1/``): assignments pushed within milliseconds.

The agent authenticates with its node token (``Authorization: Node <token>``
header), joins its server's group (``kernel.live.node_group``) and receives its
full desired state on connect and after every ``assignments.changed`` push. The
state is a snapshot, not a delta, so a lost or repeated message is harmless.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from kernel.live import node_group
from nodes.enrolment import node_for_token
from portal.api.nodes.auth import token_from_header
from scheduling import assignments


class AgentConsumer(AsyncJsonWebsocketConsumer):
    node_id: int | None = None

    async def connect(self) -> None:
        headers = dict(self.scope.get("headers", []))
        token = token_from_header(headers.get(b"authorization"))
        node = await database_sync_to_async(node_for_token)(token) if token else None
        if node is None:
            await self.close(code=4401)
            return
        self.node_id = node.pk
        await self.channel_layer.group_add(node_group(node.pk), self.channel_name)
        await self.accept()
        await self.send_state()

    async def disconnect(self, code: int) -> None:
        if self.node_id is not None:
            await self.channel_layer.group_discard(node_group(self.node_id), self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The agent asks again after a gap (e.g. it was busy): answer with the state.
        if isinstance(content, dict) and content.get("type") == "assignments.get":
            await self.send_state()

    async def assignments_changed(self, event: dict) -> None:
        await self.send_state()

    async def send_state(self) -> None:
        state = await database_sync_to_async(assignments.desired_state)(self.node_id)
        await self.send_json({"type": "assignments", **state})
