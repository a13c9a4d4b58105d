"""How long a request may wait for a token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from tokenproxy.errors import TokenUnavailable

if TYPE_CHECKING:
    from tokenproxy.proxy.target import CompiledRoute

T = TypeVar("T")


async def bounded(waiting: Awaitable[T], compiled: CompiledRoute, provider: str) -> T:
    """Wait for a token no longer than the route's timeout: the refresh itself goes on (it is
    shielded), but this request answers 503 instead of hanging."""
    try:
        async with asyncio.timeout(compiled.route.timeout):
            return await waiting
    except TimeoutError:
        raise TokenUnavailable(provider, f"provider {provider!r}: no token within the route "
                               "timeout", 1.0) from None
