"""The agent's side of the agent API: HTTP with failover across portal URLs."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("gpu-agent.portal")

API = "/api/agent/v1"


class PortalUnreachable(Exception):
    pass


class PortalClient:
    """Talks to the first portal URL that answers; on a connection error or a 502/503/504
    it moves on to the next one (round robin) and stays there while it answers."""

    def __init__(self, urls: list[str], *, user_agent: str) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.current = 0
        self.token: str | None = None
        # No proxies from the environment: agents talk to the portal directly.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False,
                                      headers={"User-Agent": user_agent})

    @property
    def base(self) -> str:
        return self.urls[self.current]

    def failover(self, why: str) -> None:
        if len(self.urls) > 1:
            old = self.base
            self.current = (self.current + 1) % len(self.urls)
            log.warning("portal %s: %s; switching to %s", old, why, self.base)

    def ws_url(self) -> str:
        parts = urlsplit(self.base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws/agent/v1/"

    def origin(self) -> str:
        parts = urlsplit(self.base)
        return f"{parts.scheme}://{parts.netloc}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Node {self.token}"} if self.token else {}

    async def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                      timeout: float | None = None, auth: bool = True) -> httpx.Response:
        errors = []
        for _ in range(len(self.urls)):
            url = f"{self.base}{API}{path}"
            try:
                response = await self.http.request(
                    method, url, json=json, params=params, headers=self.auth_headers() if auth else None,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                errors.append(f"{self.base}: {exc.__class__.__name__}")
                self.failover(exc.__class__.__name__)
                continue
            if response.status_code in (502, 503, 504):
                errors.append(f"{self.base}: HTTP {response.status_code}")
                self.failover(f"HTTP {response.status_code}")
                continue
            return response
        raise PortalUnreachable("; ".join(errors))

    async def close(self) -> None:
        await self.http.aclose()
