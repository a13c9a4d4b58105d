"""Request bodies: buffered when small enough to resend after a refresh, else streamed once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import StreamReader

from tokenproxy.proxy.rules.budget import ReplayBudget


class ReplayableBody:
    """The request body as the upstream client should send it, once or twice.

    Bodies up to ``limit`` bytes are read into memory so a retry after a 401 sends them again
    (a stream is single-use: resending it would send an empty body). Larger bodies stream
    through once; ``replayable`` is then False and the caller must not retry.
    """

    __slots__ = ("_budget", "_data", "_prefix", "_reserved", "_stream", "_used")

    def __init__(self, data: bytes | None, prefix: bytes, stream: StreamReader | None,
                 budget: ReplayBudget | None = None, reserved: int = 0) -> None:
        self._data = data
        self._prefix = prefix
        self._stream = stream
        self._used = False
        self._budget = budget
        self._reserved = reserved

    @property
    def replayable(self) -> bool:
        return self._stream is None

    @classmethod
    def empty(cls) -> ReplayableBody:
        return cls(None, b"", None)

    @classmethod
    async def read(
        cls, content: StreamReader, content_length: int | None, limit: int,
        budget: ReplayBudget, route: str,
    ) -> ReplayableBody:
        """Buffer up to *limit* bytes within the budget, reserved as they arrive (a head
        alone pins nothing); past either, keep what was read as the stream's prefix (its
        reservation is kept until release())."""
        if content_length is not None and content_length > limit:
            return cls(None, b"", content)
        reserved = 0
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                chunk = await content.readany()
                if not chunk:
                    return cls(b"".join(chunks), b"", None, budget, reserved)
                chunks.append(chunk)
                size += len(chunk)
                if size > limit or not budget.reserve(len(chunk), route):
                    break
                reserved += len(chunk)
        except BaseException:
            budget.release(reserved)
            raise
        return cls(None, b"".join(chunks), content, budget, reserved)

    def release(self) -> None:
        """Give the buffered bytes back to the budget (once; the request is over)."""
        if self._budget is not None:
            self._budget.release(self._reserved)
            self._budget = None

    @classmethod
    def streaming(cls, content: StreamReader) -> ReplayableBody:
        return cls(None, b"", content)

    async def _chain(self) -> AsyncIterator[bytes]:
        assert self._stream is not None
        yield self._prefix
        async for chunk in self._stream.iter_any():
            yield chunk

    def payload(self) -> Any:
        """What to pass as ``data=``: bytes (any number of times) or the stream (once)."""
        if self._stream is None:
            return self._data
        if self._used:
            raise RuntimeError("a streamed request body cannot be sent twice")
        self._used = True
        if self._prefix:
            return self._chain()
        return self._stream
