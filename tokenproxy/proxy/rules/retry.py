"""The one-retry rule after a refused token, shared by both request paths."""

from __future__ import annotations

import enum


class RetryAction(enum.Enum):
    RELAY = "relay"       # pass the answer on
    RENEW = "renew"       # get a newer token and send once more
    SKIP = "skipped"      # the body cannot be sent again: relay, refresh in the background
    FAILED = "failure"    # the retried request was refused too: relay it


def retry_action(status: int, retry_on: frozenset[int], client_auth: bool, retried: bool,
                 replayable: bool) -> RetryAction:
    """What to do with an upstream answer, given the route's ``retry_on`` (docs/tokens.md)."""
    if status not in retry_on or client_auth:
        return RetryAction.RELAY
    if retried:
        return RetryAction.FAILED
    if not replayable:
        return RetryAction.SKIP
    return RetryAction.RENEW
