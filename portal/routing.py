"""Websocket routes. Each app adds its consumers here."""

from __future__ import annotations

from django.urls import path

from nodes.consumers import AgentConsumer

websocket_urlpatterns: list = [
    path("ws/agent/v1/", AgentConsumer.as_asgi()),
]
