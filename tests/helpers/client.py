"""Requests to a daemon through aiohttp's client: the answer whole, or its status alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from tokenproxy.daemon import Daemon


@dataclass
class Answer:
    """A response, read to its end."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    http: aiohttp.ClientSession, daemon: Daemon, path: str = "/x", *, method: str = "GET",
    data: Any = None, timeout: float = 5.0,
) -> Answer:
    """*method* *path* on the daemon's proxy listener; a hang fails after *timeout* seconds."""
    async with http.request(method, f"http://127.0.0.1:{daemon.port()}{path}", data=data,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return Answer(r.status, r.headers, await r.read())


async def status_of(http: aiohttp.ClientSession, daemon: Daemon, path: str,
                    method: str = "GET") -> int:
    """The status of fetch(), its body read."""
    return (await fetch(http, daemon, path, method=method)).status
