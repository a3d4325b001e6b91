"""kernel.pgarrays' literals read back in PostgreSQL as the values they were made from."""

from __future__ import annotations

import pytest
from django.db import connection

from kernel import pgarrays

TRICKY = ["", "plain", "NULL", "null", " padded ", "a,b", "{braces}", 'say "hi"', "back\\slash", "\\\"",
          "tab\tand\nnewline", "semi;colon", "quote's", "GPU 0,1 (70000 MB each, exclusive)", "服务器 b-0001"]


@pytest.mark.django_db
def test_texts_round_trip():
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[]", [pgarrays.texts(TRICKY)])
        assert cursor.fetchone()[0] == TRICKY
        cursor.execute("SELECT %s::text[]", [pgarrays.texts([])])
        assert cursor.fetchone()[0] == []


@pytest.mark.django_db
def test_ints_and_bools_round_trip():
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::bigint[], %s::bigint[], %s::boolean[]",
                       [pgarrays.ints([1, -2, 3_000_000_000]), pgarrays.ints([1, None]), pgarrays.bools([True, False])])
        assert cursor.fetchone() == ([1, -2, 3_000_000_000], [1, None], [True, False])
