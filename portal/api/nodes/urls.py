from __future__ import annotations

from django.urls import path

from portal.api.nodes import longpoll, views

app_name = "agent-api"

urlpatterns = [
    path("register", views.RegisterView.as_view(), name="register"),
    path("heartbeat", views.HeartbeatView.as_view(), name="heartbeat"),
    path("assignments", longpoll.assignments_view, name="assignments"),
    path("tasks/<int:task_id>/events", views.TaskEventView.as_view(), name="task-events"),
    path("tasks/<int:task_id>/logs", views.LogChunksView.as_view(), name="task-logs"),
]
