"""The users' web portal pages (the admin lives under /admin/)."""

from __future__ import annotations

from django.urls import path

from portal import history_views, views

app_name = "portal"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("submit/", views.submit, name="submit"),
    path("tasks/", views.task_list, name="tasks"),
    path("tasks/<int:pk>/", views.task_detail, name="task"),
    path("tasks/<int:pk>/cancel/", views.task_cancel, name="task-cancel"),
    path("tasks/<int:pk>/log/", views.task_log, name="task-log"),
    path("history/gpus/<int:pk>.json", history_views.gpu, name="history-gpu"),
    path("history/servers/<int:pk>.json", history_views.server, name="history-server"),
    path("history/cluster.json", history_views.cluster, name="history-cluster"),
    path("history/tenants/<slug:slug>.json", history_views.tenant, name="history-tenant"),
    path("history/tasks/<int:pk>.json", history_views.task, name="history-task"),
    path("grants/", views.quota_grants, name="grants"),
    path("reservations/", views.reservation_list, name="reservations"),
    path("reservations/<int:pk>/release/", views.reservation_release, name="reservation-release"),
    path("calendar/", views.calendar, name="calendar"),
    path("calendar/events", views.calendar_events, name="calendar-events"),
    path("tokens/", views.tokens, name="tokens"),
    path("usage/", views.usage_page, name="usage"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
]
