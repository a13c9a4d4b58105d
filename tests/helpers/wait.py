"""Bounded waits: poll a condition in real time, or a daemon's /readyz, and fail the test
with what was awaited when the bound passes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from tokenproxy.daemon import Daemon


async def wait_for(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll *pred* every 5 ms (real time) until it holds; fail after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def readyz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/readyz") as r:
        return r.status, await r.json()


async def wait_ready(daemon: Daemon, timeout: float = 5.0) -> None:
    """Until /readyz answers 200; fail after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await readyz(daemon))[0] != 200:
        if loop.time() > deadline:
            raise AssertionError(f"not ready within {timeout}s")
        await asyncio.sleep(0.01)
