"""A Content-Length request body on the fast path, as it arrives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final

from tokenproxy.proxy.fast_path.upstream import UpstreamConn
from tokenproxy.proxy.rules.budget import ReplayBudget

# An unread request body up to this size is read and dropped after an early answer, keeping
# the connection; a larger one closes it.
DISCARD_LIMIT: Final = 256 * 1024


@dataclass(slots=True)
class RequestBody:
    """Held (to be sent, or sent again after a refused token), piped to the upstream, or
    dropped after an early answer."""

    remaining: int
    complete: asyncio.Future[None]   # every byte is in, or a whole body must stream after all
    whole: bool                      # read entirely before sending, so it can be replayed
    budget: ReplayBudget
    route: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    target: UpstreamConn | None = None
    drop: bool = False
    reserved: int = 0                # bytes of the replay budget it holds, as they arrive
    released: bool = False

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks, self.size = [], 0
        return data

    def reserve(self, size: int) -> None:
        """Hold *size* more bytes of the replay budget (a head alone pins nothing); past the
        budget the body streams instead, unreplayable."""
        if self.released:
            return   # the exchange is over: these bytes are only being dropped
        if self.budget.reserve(size, self.route):
            self.reserved += size
            return
        self.whole = False
        if not self.complete.done():
            self.complete.set_result(None)   # the exchange stops waiting, streams what is held

    def release(self) -> None:
        """The exchange is over: give the budget back (once)."""
        if not self.released:
            self.released = True
            self.budget.release(self.reserved)
            self.reserved = 0
