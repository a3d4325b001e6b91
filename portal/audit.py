"""The audit's context: who changed governance rows, and through what.

The old -> new values themselves are recorded by django-pghistory's database triggers
(the ``pghistory.track`` calls at the bottom of ``tenants/models.py``,
``nodes/models.py`` and ``scheduling/models.py``), so a change made in a shell, a management command or a raw
UPDATE is recorded like one made in the admin. What rides along here is the context
attached to those events:

- web requests (``AuditMiddleware``): the user, the URL and the source, ``admin``,
  ``api`` or ``portal``; API calls authenticated by token add their user once DRF
  has authenticated them (``note_api_user``);
- management commands (``command_context``, entered by ``manage.py``): source
  ``shell`` for ``manage.py shell`` and ``command:<name>`` for the others, with the
  operating-system user.

Changes with no context (the scheduler's loop, agents' heartbeats, psql) are still
recorded; they show as source "system". The long-running loops get no context on
purpose: pghistory prefixes every write statement with its context, and the
scheduler's and agents' hot paths change no audited row by hand.
"""

from __future__ import annotations

import contextlib
import getpass

import pghistory
from pghistory import runtime as _pghistory_runtime
from pghistory.middleware import HistoryMiddleware

_inject_context = _pghistory_runtime._inject_history_context


def _inject_context_into_writes_only(execute, sql, params, many, context):
    """pghistory's statement wrapper, but hands statements it does not prefix (reads) through
    untouched: pghistory 3.9 otherwise walks every result set of every statement to skip its
    own prefix's, which leaves a multi-statement read (the scheduler's one-round-trip snapshot
    load, run by a fit preview or an inline pass inside a request) at its last result."""
    if not _pghistory_runtime._can_inject_variable(context["cursor"], sql):
        return execute(sql, params, many, context)
    return _inject_context(execute, sql, params, many, context)


# pghistory.context looks the wrapper up by this module-level name when it is entered.
_pghistory_runtime._inject_history_context = _inject_context_into_writes_only

# Requests that never change an audited row and sit on hot paths: no context for them.
UNAUDITED_PREFIXES = ("/api/agent/", "/api/v1/tasks", "/metrics", "/static/")
# Commands that run for days (their writes are the scheduler's own, or none).
LOOP_COMMANDS = {"runscheduler", "qcluster", "devrun", "runserver", "seed_demo"}


def source_of(path: str) -> str:
    if path.startswith("/admin/"):
        return "admin"
    if path.startswith("/api/"):
        return "api"
    return "portal"


class AuditMiddleware(HistoryMiddleware):
    """pghistory's middleware, with the source of the change beside the user and URL."""

    def get_context(self, request) -> dict:
        context = super().get_context(request)
        context["source"] = source_of(request.path)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            context["username"] = user.get_username()
        return context

    def __call__(self, request):
        if request.path.startswith(UNAUDITED_PREFIXES):
            return self.get_response(request)
        return super().__call__(request)


def note_api_user(user) -> None:
    """Called by the API's token authentication: the user was unknown to the middleware."""
    pghistory.context(user=user.pk, username=user.get_username())


def command_context(argv: list[str]) -> contextlib.AbstractContextManager:
    """The context a ``manage.py`` command's changes are recorded under."""
    command = argv[1] if len(argv) > 1 else ""
    if not command or command in LOOP_COMMANDS:
        return contextlib.nullcontext()
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):
        os_user = ""
    source = "shell" if command == "shell" else f"command:{command}"
    return pghistory.context(source=source, os_user=os_user)
