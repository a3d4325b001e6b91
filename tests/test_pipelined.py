"""kernel.pipelined: statements sent now and waited for later, on the request's own
connection and transaction; one by one while an execute wrapper is installed."""

from __future__ import annotations

import pytest
from django.db import DataError, connection, transaction
from psycopg import pq

from kernel.pipelined import Pipelined


def _in_pipeline_mode() -> bool:
    return connection.connection.pgconn.pipeline_status != pq.PipelineStatus.OFF


def _prepared(marker: str) -> int:
    """How many statements containing ``marker`` this connection has prepared."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s", [f"%{marker}%"])
        return cursor.fetchone()[0]


def test_statements_sent_through_the_pipeline_answer_after_the_wait(db):
    pipelined = Pipelined()
    first = pipelined.send("SELECT %s::int + 1", [41])
    second = pipelined.send("SELECT txid_current_if_assigned() IS NOT DISTINCT FROM %s", [None])
    assert _in_pipeline_mode()  # sent, not waited for
    assert pipelined.fetchall(first, second) == [[(42,)], [(True,)]]
    assert not _in_pipeline_mode()
    assert first.closed and second.closed


def test_an_error_in_any_statement_is_raised_by_the_wait_as_djangos(db):
    with pytest.raises(DataError, match="division by zero"), transaction.atomic():
        pipelined = Pipelined()
        pipelined.send("SELECT 1")
        pipelined.send("SELECT 1 / 0")
        pipelined.close()
    with connection.cursor() as cursor:  # the connection is usable again
        cursor.execute("SELECT 2")
        assert cursor.fetchone() == (2,)


@pytest.mark.parametrize("prepare", [False, True])
def test_under_an_execute_wrapper_the_statements_run_one_by_one_unprepared(db, prepare):
    seen: list[str] = []

    def wrapper(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        pipelined = Pipelined()
        cursor = pipelined.send("SELECT %s::int AS under_a_wrapper", [7], prepare=prepare)
        assert not _in_pipeline_mode()
        assert cursor.fetchall() == [(7,)]  # answered already
        pipelined.close()
    assert seen == ["SELECT %s::int AS under_a_wrapper"]
    assert _prepared("under_a_wrapper") == 0


def test_a_statement_sent_to_be_prepared_is_prepared_once_for_the_connection(db):
    for value in (1, 2):
        pipelined = Pipelined()
        cursor = pipelined.send("SELECT %s::int * 10 AS pipelined_prepared", [value], prepare=True)
        assert pipelined.fetchall(cursor) == [[(value * 10,)]]
    assert _prepared("pipelined_prepared") == 1

