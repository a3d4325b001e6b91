"""Websocket routes. Each app adds its consumers here."""

from __future__ import annotations

from django.urls import path

from portal import consumers
from portal.agent_consumers import AgentConsumer

websocket_urlpatterns: list = [
    path("ws/agent/v1/", AgentConsumer.as_asgi()),
    path("ws/cluster/", consumers.ClusterConsumer.as_asgi()),
    path("ws/tasks/", consumers.TenantTasksConsumer.as_asgi()),
    path("ws/tasks/<slug:tenant>/", consumers.TenantTasksConsumer.as_asgi()),
    path("ws/tasks/<int:task_id>/log/", consumers.TaskLogConsumer.as_asgi()),
]
