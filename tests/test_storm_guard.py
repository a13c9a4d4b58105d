"""The storm guard on 401-triggered refreshes (tokens/guard.py): as a pure rule on times and
request targets, then end to end -- a revoked token heals at once, and neither a path refused
for scope nor a hostile local client makes more than the window allows (one refresh, and one
heal, per UNAUTHORIZED_REFRESH_GAP). The daemons share the fake clock, so the 5 s window
never passes unless a test moves the clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.client import fetch, status_of
from tests.helpers.config import MakeProxy
from tests.helpers.fakes import PASSWORD, JumpClock
from tests.helpers.idp import PASSWORD_GRANT, StartIdp, gate, oauth2_config, state_entry
from tests.helpers.metrics import refreshes
from tests.helpers.wait import wait_for, wait_ready
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


# -- end to end: a revocation heals at once ---------------------------------------------------


async def test_a_revocation_right_after_a_scope_401_heals_on_another_path(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """A path answering 401 for scope (refreshed once, refused again), then a revocation
    at the issuer, then a request on another path: 200 at once. The fresh token of the scope
    401's refresh was revoked before any request carried it successfully, so "has the token
    been accepted since" cannot tell revocation from scope; where the 401 came from can
    (/deny refused a fresh token, /ok did not: tokens/guard.py)."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")     # the deployment has been serving
    assert 401 == await status_of(http, daemon, "/deny")   # scope: refreshed once, refused
    assert ["password", "refresh_token"] == idp.calls.grants()
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok"), (
        "401 passed back: the revoked token is not healed for 5 s")


async def test_a_polled_scope_path_does_not_spend_the_heal(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """A client polling a path it lacks the scope for, among successful requests, does
    not spend the once-per-window heal on that path's 401s (it is a known refuser): a real
    revocation afterwards still heals on /ok at once, with one token call."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")
    assert 401 == await status_of(http, daemon, "/deny")   # refresh (the storm guard's one)
    assert 200 == await status_of(http, daemon, "/ok")     # the fresh token is accepted
    assert 401 == await status_of(http, daemon, "/deny")   # spends the "revocation" refresh
    assert 200 == await status_of(http, daemon, "/ok")     # ...and /ok accepts that one too
    calls = len(idp.calls.seen)
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok"), (
        "a token /ok accepted a moment ago is refused on /ok, and the 401 is passed back")
    assert calls + 1 == len(idp.calls.seen)


@pytest.mark.slow
async def test_interleaved_scope_401s_under_concurrency_stay_bounded(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """8 rounds of 30 concurrent requests, two thirds on two scope-refused paths and
    one third accepted, make at most the first token, the 401's refresh and one "revocation"
    refresh inside the window: the heal is no refresh storm."""
    idp = await start()
    idp.tap.deny.update({"/api/deny", "/api/deny2"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for _ in range(8):
        statuses = await asyncio.gather(
            *[status_of(http, daemon, "/deny" if i % 3 == 0 else "/deny2" if i % 3 == 1
                        else "/ok") for i in range(30)])
        assert {200, 401} >= set(statuses)
    assert len(idp.calls.seen) <= 3, idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected


async def test_heal_after_family_revocation_spends_no_refresh_token_twice(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """20 concurrent requests at a revoked token family (rotating refresh tokens with
    reuse detection) make one refresh (rejected) and one login, all answered 200; the
    rejection is counted as such and the login as a success."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")
    idp.issuer.revoke_all()
    statuses = await asyncio.gather(*[status_of(http, daemon, f"/ok{i}") for i in range(20)])
    assert [200] * 20 == statuses
    assert ["password", "refresh_token", "password"] == idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == refreshes(daemon, "unauthorized", "rejected", grant="refresh_token")
    assert 1 == refreshes(daemon, "unauthorized", "success", grant="password")


@pytest.mark.parametrize("revoked", ["access token", "token family"])
async def test_a_token_revoked_after_a_scope_401_heals_at_once(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    revoked: str,
) -> None:
    """A path that always answers 401 (a scope problem) refreshes once; the upstream then
    accepts the fresh token on another path; the issuer revokes it. The next request on that
    path is answered 200 at once: with one refresh, or -- when the issuer revoked the refresh
    token too -- a rejected refresh and a fresh login; the state file holds a live refresh
    token afterwards (the 5 s storm guard used to pass 401s back meanwhile)."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    state = tmp_path / "state.json"
    daemon = await make_proxy(oauth2_config(idp, tmp_path, grant_type="password",
                                            username="demo", password=PASSWORD))
    await wait_ready(daemon)
    assert 401 == (await fetch(http, daemon, "/deny")).status
    assert 200 == (await fetch(http, daemon, "/ok")).status
    assert ["password", "refresh_token"] == idp.calls.grants()
    if revoked == "access token":
        idp.issuer.revoke_access()
    else:
        idp.issuer.revoke_all()
    assert 200 == (await fetch(http, daemon, "/ok")).status
    expected = ["refresh_token"] if revoked == "access token" else ["refresh_token", "password"]
    assert ["password", "refresh_token", *expected] == idp.calls.grants()
    refresh = state_entry(state)["refresh_token"]
    family = idp.issuer._refresh[refresh]
    assert (False, refresh) == (family.revoked, family.live_refresh)


# -- end to end: 401s never make a refresh storm ----------------------------------------------


async def test_a_fresh_token_refused_again_is_not_refreshed_per_request(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The storm guard stays: a path refused for scope among accepted ones is refreshed for
    once, and then is a known refuser for UNAUTHORIZED_REFRESH_GAP, however the requests
    interleave; a second refused path may spend the window's one heal (it could have been a
    revocation), and then nothing more refreshes."""
    idp = await start()
    idp.tap.deny.update({"/api/deny", "/api/deny2", "/api/deny3"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for _ in range(10):
        assert 401 == (await fetch(http, daemon, "/deny")).status
        assert 200 == (await fetch(http, daemon, "/ok")).status
    assert 2 == len(idp.calls.seen)   # the first token, the 401's refresh
    fresh = await start()
    fresh.tap.deny.update({"/api/deny", "/api/deny2", "/api/deny3"})
    other = await make_proxy(oauth2_config(fresh, tmp_path / "other"))
    await wait_ready(other)
    for path in ("/deny", "/deny2", "/deny", "/deny2", "/deny3"):
        assert 401 == (await fetch(http, other, path)).status
    assert 3 == len(fresh.calls.seen)   # the first token, /deny's refresh, /deny2's heal


@pytest.mark.slow
async def test_a_hostile_client_forces_at_most_one_refresh_per_window_from_one_path(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A local client that alternates a request the upstream accepts and one it refuses with
    401 (any header the upstream reads as a bad credential does), once per second for 60 s,
    makes one 401-triggered token call per 5 s window: the refused path is a known refuser,
    so it never spends the heal: one refresh, then none until strictly more than 5 s later
    (at the next whole second here), so 10 in the minute, as with the storm guard alone."""
    idp = await start(lifetime=3600)
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for _ in range(60):
        assert 200 == await status_of(http, daemon, "/ok")
        assert 401 == await status_of(http, daemon, "/deny")
        await clock.tick(1)
    assert 60 / 6 == refreshes(daemon, "unauthorized")


@pytest.mark.slow
async def test_a_client_walking_refused_paths_forces_at_most_two_refreshes_per_window(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A client that asks a new refused path every time (/deny/1, /deny/2, ...) is not known
    to refuse anywhere; its 401s may be a revocation, and each window allows one such heal
    besides the storm guard's refresh: at most two 401-triggered token calls per 5 s."""
    idp = await start(lifetime=3600)
    for i in range(60):
        idp.tap.deny.add(f"/api/deny/{i}")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for i in range(60):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
        await clock.tick(1)
    forced = refreshes(daemon, "unauthorized")
    assert 60 / 6 < forced <= 2 * 60 / 5, forced


@pytest.mark.both_paths
@pytest.mark.slow
async def test_a_burst_of_401s_from_new_targets_before_any_retry_makes_at_most_two_refreshes(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """60 concurrent requests on 60 distinct refused targets (paths, queries, HEAD and
    GET alike), all 401 while the first refresh is held at the token endpoint, then again
    after it: the burst coalesces on one refresh, and the once-per-window heal adds at most
    one more; every client gets the upstream's 401."""
    idp = await start(lifetime=3600)
    targets = [(("HEAD", "GET")[i % 2], f"/deny/{i}?q={i}") for i in range(60)]
    idp.tap.deny.update(f"/api/deny/{i}" for i in range(60))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    release = asyncio.Event()
    idp.calls.queue = [gate(release)]
    burst = [asyncio.ensure_future(status_of(http, daemon, path, method))
             for method, path in targets]
    await wait_for(lambda: len(idp.tap.seen) >= 60, "every first attempt refused")
    release.set()
    assert [401] * 60 == await asyncio.gather(*burst)
    second = await asyncio.gather(*[status_of(http, daemon, p + "&again", m) for m, p in targets])
    assert [401] * 60 == second
    assert 1 <= refreshes(daemon, "unauthorized", "any") <= 2


async def test_the_storm_guard_allows_two_refreshes_in_any_five_seconds(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A client walking new refused paths gets the window's refresh and the heal at t;
    at exactly t + 5 s nothing more (a closed 5 s interval holds at most two 401-triggered
    token calls)."""
    idp = await start(lifetime=3600)
    idp.tap.deny.update(f"/api/deny/{i}" for i in range(8))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    base = refreshes(daemon, "unauthorized", "any")
    for i in (0, 1):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
    await clock.tick(5.0)
    for i in (2, 3):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
    assert refreshes(daemon, "unauthorized", "any") - base <= 2, (
        "more than two 401-triggered token calls within 5 s")


@pytest.mark.both_paths
async def test_a_known_refuser_asked_with_another_query_refreshes_nothing_in_the_window(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """The target is (route, method, path without the query) on both paths, so a
    refused path asked again with ever new queries stays a known refuser: no token call,
    and the heal is still there for a real revocation on another path."""
    idp = await start(lifetime=3600)
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 401 == await status_of(http, daemon, "/deny?a=1")   # refresh, refused again
    calls = len(idp.calls.seen)
    for i in range(20):
        assert 401 == await status_of(http, daemon, f"/deny?a={i}&b=%2F{i}")
    assert calls == len(idp.calls.seen)
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok?x=1")     # the heal, at once
    assert calls + 1 == len(idp.calls.seen)
