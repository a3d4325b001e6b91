"""The users' web portal pages (the admin lives under /admin/)."""

from __future__ import annotations

from django.urls import path

from portal import views

app_name = "portal"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("submit/", views.submit, name="submit"),
    path("tasks/", views.task_list, name="tasks"),
    path("tasks/<int:pk>/", views.task_detail, name="task"),
    path("tasks/<int:pk>/cancel/", views.task_cancel, name="task-cancel"),
    path("grants/", views.quota_grants, name="grants"),
    path("reservations/", views.reservation_list, name="reservations"),
    path("reservations/<int:pk>/release/", views.reservation_release, name="reservation-release"),
    path("calendar/", views.calendar, name="calendar"),
    path("calendar/events", views.calendar_events, name="calendar-events"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
]
