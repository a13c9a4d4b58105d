"""What happens after an upstream answer and to the connection that carried it, as pure
rules: the one retry after a refused token (proxy/rules/retry.py, docs/tokens.md) and when an
upstream connection must close after a request (proxy/rules/reuse.py)."""

from __future__ import annotations

import pytest

from tokenproxy.proxy.rules.retry import RetryAction, retry_action
from tokenproxy.proxy.rules.reuse import BODILESS_METHODS, last_request

ON_401 = frozenset({401})


@pytest.mark.parametrize(("status", "retry_on", "client_auth", "retried", "replayable",
                          "action"), [
    (200, ON_401, False, False, True, RetryAction.RELAY),     # not a refusal
    (403, ON_401, False, False, True, RetryAction.RELAY),     # not one the route retries
    (401, frozenset(), False, False, True, RetryAction.RELAY),   # retry_on: []
    (401, ON_401, True, False, True, RetryAction.RELAY),      # the client's own credentials
    (401, ON_401, False, False, True, RetryAction.RENEW),     # a newer token, once more
    (401, ON_401, False, True, True, RetryAction.FAILED),     # refused again: passed back
    (401, ON_401, False, False, False, RetryAction.SKIP),     # the body is gone upstream
    (401, ON_401, False, True, False, RetryAction.FAILED),
    (403, frozenset({401, 403}), False, False, True, RetryAction.RENEW),
    (200, ON_401, False, True, True, RetryAction.RELAY),      # the retry succeeded
])
def test_retry_action(status: int, retry_on: frozenset[int], client_auth: bool, retried: bool,
                      replayable: bool, action: RetryAction) -> None:
    assert action is retry_action(status, retry_on, client_auth, retried, replayable)


def test_the_four_decisions_after_an_answer() -> None:
    """Relay it, renew the token and send again, skip the retry (the body is gone), or give
    up after a second refusal; Proxy.send_again turns them into the outcomes of
    tokenproxy_auth_retries_total (docs/metrics.md)."""
    assert ["relay", "renew", "skipped", "failure"] == [a.value for a in RetryAction]


@pytest.mark.parametrize(("method", "has_body", "last"), [
    ("GET", False, False), ("POST", False, False), ("PUT", True, False),
    ("POST", True, False), ("PATCH", True, False), ("PROPFIND", True, False),
    ("GET", True, True), ("DELETE", True, True), ("OPTIONS", True, True),
    ("HEAD", False, True), ("HEAD", True, True),
])
def test_which_requests_close_their_upstream_connection(method: str, has_body: bool,
                                                        last: bool) -> None:
    """A body on a method that usually has none, and every HEAD, is the connection's last
    request: the upstream may not read such a body, and may send a body after a HEAD
    answer; either would be taken for the next request's bytes."""
    assert last is last_request(method, has_body)


def test_the_bodiless_methods() -> None:
    assert frozenset({"GET", "HEAD", "DELETE", "OPTIONS"}) == BODILESS_METHODS
