"""Django's PostgreSQL backend, whose pooled connections are checked without a round trip.

With a pool (``DB_POOL_MAX_SIZE``: the web nodes) and ``CONN_HEALTH_CHECKS``, Django has psycopg_pool
check each connection it hands to a request with an empty query: one more round trip on every
request, a fifth of a heartbeat's, at about 50 µs of the web process's CPU and some of the server's.
But a connection idle in the pool has nothing to read unless the server ended it: a restart, a
failover or ``pg_terminate_backend`` leaves its last message or the end of the stream waiting on the
socket. So this backend looks at the socket first and sends the empty query only when something is
waiting there; a connection that fails it is thrown away (the pool opens another) and the next one
is checked. A peer that vanished without a word (a cut cable) shows nothing to either check: the
TCP keepalives and ``tcp_user_timeout`` in the settings end such a connection within seconds.
(``tests/test_db_pool.py`` ends every pooled connection and expects no request to fail.)
"""

from __future__ import annotations

import select

import psycopg
from django.db.backends.postgresql import base
from psycopg import pq


def _usable(conn: psycopg.Connection) -> bool:
    if conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
        return False
    poller = select.poll()  # not select(): descriptors above 1023
    poller.register(conn.fileno(), select.POLLIN)
    if not poller.poll(0):
        return True
    try:
        conn.execute("")  # reads what waits: a notice is fine, a goodbye raises
    except psycopg.Error:
        return False
    return True


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        conn = super().get_new_connection(conn_params)
        pool = self.pool
        if pool is None:
            return conn
        for _ in range(pool.max_size):  # every connection in the pool may have been ended at once
            if _usable(conn):
                return conn
            conn.close()
            pool.putconn(conn)  # closed: discarded, and the pool opens a new one in the background
            conn = super().get_new_connection(conn_params)
        return conn
