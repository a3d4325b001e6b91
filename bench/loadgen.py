"""The benches' HTTP/1.1 client: keep-alive sockets, requests as bytes, responses framed by Content-Length.

The load generators share the machine's cores with the web processes and PostgreSQL they
measure, so what they spend per request is taken from the figure. ``http.client`` parses each
response's headers through the email package and httpx adds its own layers: measured per
request, 0.34 ms (``bench/api.py``'s submits with ``http.client``) and 1.4 ms (``bench/agent.py``'s
heartbeats with httpx's async client) against about 0.1 ms with this. Only for the benches' own
loopback servers, which always send a Content-Length.
"""

from __future__ import annotations

import socket


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    conn = socket.create_connection((host, port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def request(method: str, port: int, path: str, authorization: str, body: bytes) -> bytes:
    """A request with a JSON body, as the bytes to send."""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def read_response(conn: socket.socket, data: bytes) -> tuple[int, bytes, bytes]:
    """Read one response: (status, body, the bytes read past it). ``data``: the bytes the previous
    call read past its response. Raises OSError on a closed connection or a response without a
    Content-Length."""
    while (end := data.find(b"\r\n\r\n")) < 0:
        data += _recv(conn)
    head, data = data[:end].lower(), data[end + 4:]
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise OSError(f"a response without a Content-Length: {head[:200]!r}")
    line_end = head.find(b"\r\n", at + 2)
    length = int(head[at + 17:line_end if line_end > 0 else len(head)])
    while len(data) < length:
        data += _recv(conn)
    return int(head[9:12]), data[:length], data[length:]


def _recv(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise ConnectionResetError("the server closed the connection")
    return chunk
