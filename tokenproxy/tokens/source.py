"""Token values and the interface every token source offers the proxy."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

# subject: the token this one is exchanged from changed (subject_token_provider).
Trigger = Literal["initial", "expiry", "unauthorized", "manual", "subject"]
# Where a request went: (route, method, path without the query).
Target = tuple[str, str, str]

# RFC 6750 b64token plus the characters real tokens use; no spaces, CR, LF or NUL.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9\-._~+/=!#$%&'*^`|]+")
MAX_TOKEN_LENGTH: Final = 16 * 1024


def is_usable_token(value: str) -> bool:
    """A token we can put in a header: bounded, visible ASCII, nothing that splits a header."""
    return 0 < len(value) <= MAX_TOKEN_LENGTH and _TOKEN_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Token:
    """One access token. ``expires_at`` is on the monotonic clock; None means unknown/never."""

    value: str = field(repr=False)
    expires_at: float | None = None
    generation: int = 0

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class TokenSource(Protocol):
    """What the proxy needs from a provider: the current token, and a new one after a 401."""

    name: str

    async def start(self) -> None:
        """Begin fetching in the background; never blocks the listeners from opening."""

    async def close(self) -> None: ...

    async def current(self) -> Token:
        """A token to use now; raises TokenUnavailable or Unauthenticated."""

    def valid_now(self) -> Token | None:
        """The token ``current()`` would return without waiting, else None (the fast path)."""

    async def renew(self, stale: Token, trigger: Trigger, target: Target) -> Token | None:
        """A token newer than *stale*, which *target* refused; or None when nothing newer can
        be had (do not retry)."""

    def accepted(self, target: Target) -> None:
        """*target* answered a request carrying this source's token without refusing it."""

    def refused(self, target: Target) -> None:
        """*target* refused a token this source had just renewed for it."""

    def ready(self) -> bool:
        """True while the source holds a valid token or can get one without waiting."""

    def describe(self) -> dict[str, Any]:
        """A secret-free state summary for /readyz."""
