"""The benches' load generators: a lean HTTP/1.1 client, and collecting the load processes' results.

The load generators share the machine's cores with the web processes and PostgreSQL they
measure, so what they spend per request is taken from the figure. ``http.client`` parses each
response's headers through the email package and httpx adds its own layers: measured per
request, 0.34 ms (``bench/api.py``'s submits with ``http.client``) and 1.4 ms (``bench/agent.py``'s
heartbeats with httpx's async client) against about 0.1 ms with ``KeepAlive``: requests made as
bytes, responses framed by their Content-Length. Only for the benches' own loopback servers,
which always send one.
"""

from __future__ import annotations

import queue
import socket


def request(method: str, port: int, path: str, authorization: str, body: bytes = b"") -> bytes:
    """A request with a JSON body, as the bytes to send."""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class KeepAlive:
    """One keep-alive connection to a port on loopback, opened on first use and again after a failure."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.port, self.timeout = port, timeout
        self._conn: socket.socket | None = None
        self._pending = b""  # bytes read past the last response

    def exchange(self, raw_request: bytes) -> tuple[int, bytes]:
        """Send one request (``request()``'s bytes); its (status, body). Raises OSError when the
        connection failed or closed (it is closed then; the next exchange opens another)."""
        try:
            if self._conn is None:
                self._conn = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn.sendall(raw_request)
            return self._read_response()
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._pending = None, b""

    def _read_response(self) -> tuple[int, bytes]:
        data = self._pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head, data = data[:end].lower(), data[end + 4:]
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise OSError(f"a response without a Content-Length: {head[:200]!r}")
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end > 0 else len(head)])
        while len(data) < length:
            data += self._recv()
        self._pending = data[length:]
        return int(head[9:12]), data[:length]

    def _recv(self) -> bytes:
        chunk = self._conn.recv(65536)  # type: ignore[union-attr]
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        return chunk


def results_of(procs: list, out, timeout: float) -> list:
    """One result per process from ``out``, then the processes joined. A process that died without
    its result (its traceback is above) ends the bench with one line instead of a wait forever."""
    results = []
    for _ in procs:
        try:
            results.append(out.get(timeout=timeout))
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            for p in procs:
                p.kill()
            raise SystemExit(f"a load process gave no result within {timeout:.0f} s (exit codes {codes})") from None
    for p in procs:
        p.join()
    return results
