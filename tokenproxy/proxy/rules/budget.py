"""How many request-body bytes may be held for a retry at once, across both request paths."""

from __future__ import annotations

from tokenproxy.metrics import Metrics


class ReplayBudget:
    """Bytes of request bodies held for replay, across all requests and both paths.

    Each body is bounded by max_replay_body; this bounds their sum (max_replay_total), so
    many connections sending bodies to a slow upstream cannot hold a gigabyte between them.
    A body that does not fit streams instead, as one over max_replay_body does.
    """

    def __init__(self, total: int, metrics: Metrics) -> None:
        self.total = total
        self.held = 0
        self._gauge = metrics.replay_buffered
        self._exceeded = metrics.replay_budget_exceeded

    def reserve(self, size: int, route: str) -> bool:
        if self.held + size > self.total:
            self._exceeded.labels(route).inc()
            return False
        self.held += size
        self._gauge.set(self.held)
        return True

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            self._gauge.set(self.held)
