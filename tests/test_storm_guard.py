"""The storm guard on 401-triggered refreshes (tokens/guard.py), as a pure rule on times and
request targets."""

from __future__ import annotations

from tokenproxy.tokens.guard import MAX_REFUSERS, UNAUTHORIZED_REFRESH_GAP, UnauthorizedGuard

GAP = UNAUTHORIZED_REFRESH_GAP
OK = ("/", "GET", "/ok")
DENY = ("/", "GET", "/deny")


def refresh(guard: UnauthorizedGuard, target: tuple[str, str, str], now: float) -> bool:
    """What the token manager does with a 401: ask, and start a refresh if admitted."""
    if not guard.admits(target, now):
        return False
    guard.started(now)
    return True


def test_the_first_401_refreshes_and_a_known_refuser_waits_out_the_window() -> None:
    guard = UnauthorizedGuard()
    assert refresh(guard, DENY, 0.0)
    guard.refused(DENY)                        # the retry with the fresh token: 401 again
    assert not refresh(guard, DENY, 1.0)
    assert not refresh(guard, DENY, GAP)
    assert refresh(guard, DENY, GAP + 0.001)   # a new window: one refresh again


def test_another_target_heals_once_per_window() -> None:
    guard = UnauthorizedGuard()
    assert refresh(guard, DENY, 0.0)
    guard.refused(DENY)
    assert refresh(guard, OK, 1.0)             # may be a revocation: refreshed at once
    assert not refresh(guard, ("/", "GET", "/other"), 2.0)   # the heal is spent
    assert refresh(guard, ("/", "GET", "/other"), 1.0 + GAP + 0.001)


def test_at_most_two_refreshes_in_any_window_of_the_gap() -> None:
    """Two at t (the refresh and the heal), none more until strictly after t + gap."""
    guard = UnauthorizedGuard()
    assert refresh(guard, DENY, 0.0)
    assert refresh(guard, OK, 0.0)
    assert not refresh(guard, ("/", "GET", "/a"), GAP)
    assert not refresh(guard, ("/", "GET", "/b"), GAP)
    assert refresh(guard, ("/", "GET", "/a"), GAP + 0.001)


def test_a_target_that_accepts_a_token_is_no_refuser_any_more() -> None:
    guard = UnauthorizedGuard()
    assert refresh(guard, DENY, 0.0)
    guard.refused(DENY)
    guard.accepted(DENY)                       # its scope was granted meanwhile
    assert refresh(guard, DENY, 1.0)


def test_refusers_are_bounded_oldest_forgotten_first() -> None:
    guard = UnauthorizedGuard()
    assert refresh(guard, DENY, 0.0)
    guard.refused(DENY)
    for i in range(MAX_REFUSERS):
        guard.refused(("/", "GET", f"/p{i}"))
    assert not refresh(guard, ("/", "GET", f"/p{MAX_REFUSERS - 1}"), 1.0)   # remembered
    assert refresh(guard, DENY, 1.0)           # forgotten: treated as any other target
