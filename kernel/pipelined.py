"""Statements sent now and waited for later, on this thread's connection and transaction.

psycopg's pipeline mode sends a statement without waiting for its answer: PostgreSQL runs
it while the caller goes on in Python (on the other core), and ``fetchall()`` collects every
answer at once. The scheduler's pass uses it to read the GPU rows while it parses the rest
of its snapshot, and to write placements while its core decides the next ones.

Each statement must be a single one (pipeline mode uses the extended protocol, which takes
one statement per message). While an execute wrapper is installed (the audit's pghistory
context prefixes writes with a second statement; see ``kernel.prepared``) the statements run
one by one, as Django's own do: the same results, without the overlap.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

from kernel.prepared import preparing_cursor


class Pipelined:
    """``send`` statements, then ``fetchall`` the rows of those whose answers are wanted (or
    ``close``): either ends pipeline mode, always. A database error in any of them is raised
    there, translated as Django translates it."""

    def __init__(self) -> None:
        self.db = connections[DEFAULT_DB_ALIAS]
        self._pipeline: ExitStack | None = None
        self._cursors: list[Any] = []

    def send(self, sql: str, params: Any = None, *, prepare: bool = False) -> Any:
        """Send ``sql``; with ``prepare``, as a statement prepared once per connection
        (``kernel.prepared``: the same rules, and the same fallback to Django's cursor)."""
        self.db.ensure_connection()
        if self._pipeline is None and not self.db.execute_wrappers:
            self._pipeline = ExitStack()
            self._pipeline.enter_context(self.db.connection.pipeline())
        cursor = preparing_cursor(self.db) if prepare else self.db.cursor()
        cursor.execute(sql, params)
        self._cursors.append(cursor)
        return cursor

    def _wait(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            with self.db.wrap_database_errors:
                pipeline.close()

    def fetchall(self, *cursors: Any) -> list[list[tuple]]:
        """Wait for every statement; the rows of each of ``cursors`` (as ``send`` returned
        them), in order. Closes every cursor, whatever happens."""
        try:
            self._wait()
            return [cursor.fetchall() for cursor in cursors]
        finally:
            self.close()

    def close(self) -> None:
        """Wait for every statement, then close the cursors."""
        try:
            self._wait()
        finally:
            cursors, self._cursors = self._cursors, []
            for cursor in cursors:
                cursor.close()
