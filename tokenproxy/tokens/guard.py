"""When a 401 may start a refresh: the storm guard, and how it still heals a revoked token.

A refresh after a 401 is normal (the token expired early, or was revoked). A second one within
UNAUTHORIZED_REFRESH_GAP is not, in general: a fresh token that is refused again is a scope or
permission problem, and refreshing per request would be a storm against the token endpoint.

But a token can also be revoked right after such a refresh. The guard tells the two apart by
*where* the 401 came from: a request target (route, method, path) that refused a fresh token
is a known refuser, and its 401s never refresh within the window; a 401 from any other target
means the token may have gone bad, and refreshes at once -- at most once per window that way,
so that a client walking through refused paths cannot turn each request into a refresh. At
most two 401-triggered refreshes within any UNAUTHORIZED_REFRESH_GAP, whatever the clients
do.
"""

from __future__ import annotations

from typing import Final

from tokenproxy.tokens.source import Target

UNAUTHORIZED_REFRESH_GAP: Final = 5.0
# Known refusers remembered (the oldest forgotten first); hashes, not the paths themselves.
MAX_REFUSERS: Final = 1024


class UnauthorizedGuard:
    """The storm guard of one token source; times are on its clock's monotonic scale."""

    def __init__(self) -> None:
        self._last_refresh = -1e18   # the last 401-triggered refresh
        self._last_bypass = -1e18    # the last one started within another's window
        self._refusers: dict[int, None] = {}

    def admits(self, target: Target, now: float) -> bool:
        """Whether a 401 from *target* for the newest token may start a refresh now."""
        # Strictly more than the gap: two refreshes at t and two more at exactly t + gap
        # would be four within one closed window of the gap's length.
        if now - self._last_refresh > UNAUTHORIZED_REFRESH_GAP:
            return True
        return (hash(target) not in self._refusers
                and now - self._last_bypass > UNAUTHORIZED_REFRESH_GAP)

    def started(self, now: float) -> None:
        """A 401-triggered refresh starts now (after admits said so)."""
        if now - self._last_refresh <= UNAUTHORIZED_REFRESH_GAP:
            self._last_bypass = now
        self._last_refresh = now

    def refused(self, target: Target) -> None:
        """*target* refused a token fresh from a 401-triggered refresh."""
        key = hash(target)
        self._refusers.pop(key, None)
        self._refusers[key] = None
        if len(self._refusers) > MAX_REFUSERS:
            del self._refusers[next(iter(self._refusers))]

    def accepted(self, target: Target) -> None:
        """*target* accepted a token: whatever it refused before, it is no refuser now."""
        if self._refusers:
            self._refusers.pop(hash(target), None)
