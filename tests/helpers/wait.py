"""Bounded waits: poll a condition in real time (a function, or a coroutine function), a
daemon's /readyz or a provider's state in it, the access log line, or a count until it stops
moving; fail the test with what was awaited when the bound passes."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.helpers.logs import CapturedLogs
from tokenproxy.daemon import Daemon

Condition = Callable[[], bool | Awaitable[bool]]


async def _holds(pred: Condition) -> bool:
    result = pred()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


async def wait_for(pred: Condition, what: str, timeout: float = 5.0,
                   every: float = 0.005) -> None:
    """Poll *pred* every *every* seconds (real time) until it holds; fail after *timeout*
    seconds. *pred* may be a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _holds(pred):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def request_event(logs: CapturedLogs, timeout: float = 5.0) -> dict[str, Any]:
    """The test's one access log line (event ``request``), once it is written; fails if
    there is more than one."""
    await wait_for(lambda: bool(logs.events("request")), "the access log line", timeout)
    [event] = logs.events("request")
    return event


async def settle(seconds: float = 0.05) -> None:
    """A short real wait, to show that something does *not* happen."""
    await asyncio.sleep(seconds)


async def readyz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/readyz") as r:
        return r.status, await r.json()


async def wait_ready(daemon: Daemon, timeout: float = 5.0) -> None:
    """Until /readyz answers 200; fail after *timeout* seconds."""
    async def ready() -> bool:
        return (await readyz(daemon))[0] == 200

    await wait_for(ready, "/readyz to answer 200", timeout, every=0.01)


async def provider_state(daemon: Daemon, within: float = 5.0,
                         states: tuple[str, ...] = ("misconfigured", "backoff", "valid"),
                         provider: str = "idp") -> str:
    """The provider's /readyz state once it is one of *states*, or the one it has after
    *within* seconds (for the test to compare)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        _, doc = await readyz(daemon)
        state = str(doc["providers"][provider]["state"])
        if state in states or loop.time() > deadline:
            return state
        await asyncio.sleep(0.02)


async def settled(value: Callable[[], int], quiet: float = 0.3, limit: float = 5.0) -> int:
    """*value* once it has not moved for *quiet* seconds (or after about *limit* seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last = -1
    while loop.time() < deadline and value() != last:
        last = value()
        await asyncio.sleep(quiet)
    return value()
