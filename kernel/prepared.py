"""Prepared statements for the hand-written statements that every submit and heartbeat runs,
and for the batches in which a pass writes its placements (``kernel.pipelined``).

Django's PostgreSQL backend binds parameters on the client: each statement reaches the
server as new text, which PostgreSQL parses and plans afresh. For a submit that was most
of the database's work: its membership query and its insert (a task, its event and the
tenant's pending count in one statement) spent about 0.6 ms of the server's CPU in
planning alone, more than in running them; a heartbeat's four statements cost the server
1.2 ms, and 0.5 ms prepared.

``prepared_cursor()`` runs statements on the same connection and in the same transaction,
but binds on the server and prepares each statement once per connection. psycopg keeps
the names; a rollback makes it deallocate them all (the next use prepares again), and a
statement whose tables change is re-planned by PostgreSQL itself, unless a migration
changes the type of a column the statement returns: PostgreSQL then refuses it ("cached
plan must not change result type") until the connection is replaced, so restart the web
processes after such a migration, as a deployment does anyway.

Only for single statements whose text does not vary with the values: a multi-statement
batch cannot be prepared, and text that embeds values would fill the connection's cache.
While an execute wrapper is installed the statements run as Django's own do: a wrapper may
rewrite them, and the audit's (pghistory's context, ``portal.audit``) prefixes each write with
a second statement, which the server-side protocol refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.postgresql.base import ServerBindingCursor


class _PreparingCursor(ServerBindingCursor):
    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True, binary=binary)

    def _send_query_prepared(self, name, pgq, *, binary=None):
        # psycopg keeps the statement it sent (which Django's query log reads: DEBUG, the
        # tests' query capture) only when it was not a prepared one.
        self._query = pgq
        return super()._send_query_prepared(name, pgq, binary=binary)


@contextmanager
def prepared_cursor() -> Iterator:
    """A cursor of this thread's connection (as ``connection.cursor()``: Django's error
    translation, its query log and capture in tests) whose statements are prepared."""
    db = connections[DEFAULT_DB_ALIAS]  # the wrapper, once: each read of the proxy is a thread-local lookup
    db.close_if_health_check_failed()
    db.ensure_connection()
    with preparing_cursor(db) as cursor:
        yield cursor


def preparing_cursor(db):
    """``db``'s cursor (connected already) whose statements are prepared, wrapped as
    ``db.cursor()`` wraps its own; ``db.cursor()`` itself where statements are not prepared."""
    if db.connection.prepare_threshold is None or db.execute_wrappers:
        # DB_PREPARED_STATEMENTS=false, or a wrapper may rewrite the statement.
        return db.cursor()
    # The preparing cursor wrapped as ``connection.cursor()`` wraps its own (``_cursor()``:
    # ``_prepare_cursor`` picks the debug wrapper when queries are logged), instead of making
    # Django's cursor and swapping its psycopg cursor out: a second psycopg cursor made and
    # closed for every statement cost a fifth of a prepared statement's client CPU (19 of
    # 91 µs), and a submit runs five of them.
    with db.wrap_database_errors:
        raw = _PreparingCursor(db.connection)
    return db._prepare_cursor(raw)
