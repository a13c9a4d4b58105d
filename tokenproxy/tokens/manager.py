"""The token lifecycle (docs/tokens.md) for providers that talk to a token endpoint.

One TokenManager per provider. Invariants:
- at most one token-endpoint call in flight (``_inflight``), shared by every waiter through
  ``asyncio.shield``, so a client hanging up cancels only its own wait;
- a 401 for a token that was already replaced just retries with the current one;
- a failed call starts a jittered backoff (1 s doubling to 60 s); meanwhile requests without a
  valid token get TokenUnavailable at once, so no storm reaches the endpoint;
- the refresh token is written to the store (under its lock, after re-reading it) before
  the new access token is used;
- with a shared store (Redis), a refresh token is spent only under the shared lock, and not at
  all when another holder may have spent it already (it vanished mid-call, or the stored
  state was lost): a provider that can log in does so instead.

The longest module here, because TokenManager is one state machine (see its docstring); what
shares none of its state lives in calls.py, guard.py, expiry.py and state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from tokenproxy import log
from tokenproxy.clock import Clock
from tokenproxy.errors import (
    LoginRequired,
    ProviderMisconfigured,
    SharedStateDown,
    TokenUnavailable,
    Unauthenticated,
)
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.calls import Grantor, TokenCalls
from tokenproxy.tokens.discovery import DiscoveryFailed
from tokenproxy.tokens.expiry import lifetime, refresh_delay
from tokenproxy.tokens.grant import Grant, GrantFailed, GrantRejected, LoginNeeded
from tokenproxy.tokens.guard import UnauthorizedGuard
from tokenproxy.tokens.source import Target, Token, Trigger
from tokenproxy.tokens.state import StateLockTimeout, StoredTokens, identity_key
from tokenproxy.tokens.store import (
    SharedStateUnavailable,
    SharedStateUnreadable,
    StoreWriteFailed,
    TokenStore,
)
from tokenproxy.tokens.subject import Subject

LOGIN_POLL: Final = 1.0
BACKOFF_START: Final = 1.0
BACKOFF_MAX: Final = 60.0
# How soon a provider that must not refresh without the shared state looks at it again.
SHARED_RETRY: Final = 1.0
# What a refresh raises to its waiters; the background loop carries on after each.
_REFRESH_ERRORS: Final = (TokenUnavailable, Unauthenticated, ProviderMisconfigured, LoginRequired)


def _after(clock: Clock, stored: StoredTokens | None) -> float:
    """Now, and never before the entry it replaces (a clock behind, or the same instant)."""
    now = clock.time()
    return now if stored is None else max(now, stored.obtained_at + 0.001)


def _mark(entry: StoredTokens) -> tuple[float, str | None, str | None]:
    """What tells one stored entry from another (without holding its secrets twice)."""
    return entry.obtained_at, _seed(entry.access_token), _seed(entry.refresh_token)


def _seed(refresh_token: str | None) -> str | None:
    """A fingerprint of the configured refresh token: a new one in the config beats the file."""
    if refresh_token is None:
        return None
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


class TokenManager:
    """Implements TokenSource for oauth2, json and command providers.

    Longer than most classes here because it is one state machine: the token, the refresh
    token, the call in flight, the backoff and the unauthenticated state change together,
    under the invariants in the module docstring. What has no share in that state lives
    apart: the calls to the endpoint (calls.py), the storm guard (guard.py), expiry
    arithmetic (expiry.py), the state file (state.py).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        grantor: Grantor,
        *,
        identity: Mapping[str, str],
        refresh_margin: float,
        clock: Clock,
        metrics: Metrics,
        redactor: Redactor,
        store: TokenStore | None = None,
        default_lifetime: float | None = None,
        lock_timeout: float = 30.0,
        rng: random.Random | None = None,
        subject: Subject | None = None,
    ) -> None:
        self.name = name
        self._kind = kind
        self._identity = tuple(sorted(identity.items()))
        self._key = (identity_key(name, identity) if store is None
                     else store.key_for(name, identity))
        self._margin = refresh_margin
        self._clock = clock
        self._metrics = metrics
        self._redactor = redactor
        self._store = store
        self._default_lifetime = default_lifetime
        # A lease left by a replica that died runs out only after the store's own bound.
        self._lock_timeout = max(lock_timeout, 0.0 if store is None else store.lock_wait)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = log.get_logger(provider=name)
        self._calls = TokenCalls(name, grantor, metrics, self._log)

        self._token: Token | None = None
        self._lifetime: float | None = None
        self._obtained_mono = 0.0
        self._obtained_wall = 0.0
        self._generation = 0
        self._refresh_token = grantor.initial_refresh_token
        self._rejected_refresh: str | None = None   # a fingerprint (_seed) of the last one
        self._config_seed = _seed(grantor.initial_refresh_token)
        self._inflight: asyncio.Task[Token] | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._unauthenticated = False   # or misconfigured: stuck until a reload either way
        self._misconfigured = False
        # A person must log in (`tokenproxy login`): stuck, but the store is looked at every
        # LOGIN_POLL seconds for what such a login wrote.
        self._login_required = False
        self._dropped: str | None = None   # the access token in hand when it began
        # The stored entry this process last wrote or took (the state file has no version).
        self._last_mark: tuple[float, str | None, str | None] | None = None
        self._account: str | None = None   # who logged in, kept with the tokens
        self._last_error: str | None = None
        self._shared_problem: str | None = None   # why the shared state cannot be used now
        # The shared-state version this replica last read or wrote (0: none yet). Replicas'
        # wall clocks disagree, so a fenced store's entry is judged newer by this, not by time.
        self._version = 0
        self._calling = False   # the refresh in flight has begun its token-endpoint call
        self._guard = UnauthorizedGuard()
        self._loop_task: asyncio.Task[None] | None = None
        self._inherited = False
        self._wake = asyncio.Event()
        # Exchanged from another provider's token: renewed when that one changes.
        self._subject = subject
        self._unwatch: Callable[[], None] | None = None
        self._watchers: list[Callable[[], None]] = []
        self._coalesced = metrics.token_refresh_coalesced.labels(name)
        for secret in (grantor.initial_refresh_token,):
            if secret:
                redactor.add(secret)

    # -- TokenSource -------------------------------------------------------------------------

    async def load(self) -> None:
        """Take persisted tokens from the store, if it has usable ones for us. A shared store
        that does not answer is no reason not to start: the first refresh tries again.

        A provider exchanging another's token takes only a stored token exchanged from the
        subject's token as it is now (the entry's seed is that token's fingerprint)."""
        if self._store is not None:
            with contextlib.suppress(SharedStateUnavailable):
                stored = await self._store.read(self._key)
                if stored is not None:
                    self._adopt_stored(stored)

    def inherit(self, old: TokenManager) -> None:
        """Take over a reloaded provider's tokens (same identity); failures start afresh, since
        the new config may be what fixes them."""
        if old._identity != self._identity:
            return
        self._token, self._lifetime = old._token, old._lifetime
        self._obtained_mono, self._obtained_wall = old._obtained_mono, old._obtained_wall
        self._generation = old._generation
        self._version = old._version
        self._account = old._account
        if self._subject is not None and old._subject is not None:
            self._subject.used = old._subject.used
        if self._config_seed == old._config_seed:
            self._rejected_refresh = old._rejected_refresh
            if old._refresh_token:
                self._refresh_token = old._refresh_token
        if old._token is not None:
            self._metrics.token_expiry.labels(self.name).set(
                0 if old._token.expires_at is None or old._lifetime is None
                else self._obtained_wall + old._lifetime)
        self._inherited = True

    @property
    def unauthenticated(self) -> bool:
        return self._unauthenticated

    @property
    def stuck(self) -> bool:
        """Only a reload with new credentials helps (a provider a person logs in to is not
        stuck: a login heals it, with no reload)."""
        return self._unauthenticated and not self._login_required

    async def start(self) -> None:
        """Load persisted tokens, then fetch or refresh in the background (trigger initial)."""
        self._metrics.provider_authenticated.labels(self.name).set(1)
        if not self._inherited:
            self._metrics.token_expiry.labels(self.name).set(0)
            await self.load()
        if self._subject is not None:
            self._unwatch = self._subject.watch(self._wake.set)
        self._loop_task = asyncio.create_task(self._run(), name=f"tokens:{self.name}")

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call *wake* whenever this provider gets a new token (a provider exchanging it, see
        subject.py); returns what undoes that."""
        self._watchers.append(wake)
        return lambda: self._watchers.remove(wake) if wake in self._watchers else None

    def _tell_watchers(self) -> None:
        for wake in list(self._watchers):
            wake()

    def _subject_moved(self) -> bool:
        return self._subject is not None and self._subject.moved()

    def _subject_stale(self) -> bool:
        """The subject moved and a re-exchange may be tried now: requests wait for it (one
        call for all). While re-exchanges fail, the token in hand serves."""
        return self._subject_moved() and self._clock.monotonic() >= self._next_attempt

    async def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        inflight = self._inflight
        if inflight is not None:
            if not self._calling:
                inflight.cancel()   # still waiting for the lock: nothing to lose
            # A call in flight finishes (within its own timeout) and persists its result.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(inflight)

    def valid_now(self) -> Token | None:
        tok = self._token
        if tok is not None and not self._unauthenticated and (
            tok.expires_at is None or self._clock.monotonic() < tok.expires_at
        ) and not (self._subject is not None and self._subject_stale()):
            return tok
        return None

    async def current(self) -> Token:
        tok = self.valid_now()
        if tok is not None:
            return tok
        tok = self._token
        if self._login_required:
            raise self._login_error()
        if self._unauthenticated:
            raise self._unauthenticated_error()
        self._raise_if_backing_off()
        if tok is not None and not tok.expired(self._clock.monotonic()):
            # Still valid, but exchanged from a subject token that has been replaced.
            try:
                return await self._refresh("subject", waiter=True)
            except TokenUnavailable:
                return tok   # serves until the re-exchange works or the issuer refuses it
        return await self._refresh("initial" if tok is None else "expiry", waiter=True)

    def accepted(self, target: Target) -> None:
        self._guard.accepted(target)

    def refused(self, target: Target) -> None:
        self._guard.refused(target)

    async def renew(self, stale: Token, trigger: Trigger, target: Target) -> Token | None:
        if self._login_required:
            raise self._login_error()
        if self._unauthenticated:
            raise self._unauthenticated_error()
        now = self._clock.monotonic()
        cur = self._token
        if cur is not None and cur.generation != stale.generation and not cur.expired(now):
            return cur   # someone already replaced the refused token: just retry
        if self._inflight is None:
            if not self._guard.admits(target, now):
                return None   # the storm guard (guard.py)
            self._raise_if_backing_off()
            self._guard.started(now)
        fresh = await self._refresh(trigger, waiter=True)
        return fresh if fresh.generation != stale.generation else None

    def ready(self) -> bool:
        if self._unauthenticated:
            return False
        tok = self._token
        if tok is None:
            return False
        if not tok.expired(self._clock.monotonic()):
            return True
        if self._shared_problem is not None:
            return False
        return self._clock.monotonic() >= self._next_attempt   # expired but can get one

    def describe(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        tok = self._token
        if self._login_required:
            state = "login_required"
        elif self._unauthenticated:
            state = "misconfigured" if self._misconfigured else "unauthenticated"
        elif tok is not None and not tok.expired(now):
            state = "valid"
        elif self._shared_problem is not None:
            state = "shared_state_unavailable"
        elif now < self._next_attempt:
            state = "backoff"
        elif self._inflight is not None:
            state = "fetching"
        else:
            state = "expired" if tok is not None else "none"
        out: dict[str, Any] = {"type": self._kind, "state": state}
        out["expires_in"] = (
            round(tok.expires_at - now, 1) if tok is not None and tok.expires_at is not None
            else None
        )
        if self._failures:
            out["failures"] = self._failures
            out["retry_in"] = round(max(0.0, self._next_attempt - now), 1)
        if self._shared_problem is not None:
            out["error"] = self._shared_problem
        elif self._last_error:
            out["error"] = self._last_error
        return out

    # -- single flight -----------------------------------------------------------------------

    def _unauthenticated_error(self) -> Unauthenticated | ProviderMisconfigured:
        if self._misconfigured:
            return ProviderMisconfigured(
                self.name, f"provider {self.name!r}: {self._last_error}; fix it and reload "
                "(it is looked at again every minute)")
        return Unauthenticated(self.name, f"provider {self.name!r}: credentials were rejected")

    def _raise_if_backing_off(self) -> None:
        wait = self._next_attempt - self._clock.monotonic()
        if wait > 0 and self._inflight is None and self._shared_problem is not None:
            raise SharedStateDown(self.name, self._shared_problem, wait)
        if wait > 0 and self._inflight is None:
            raise TokenUnavailable(
                self.name, f"provider {self.name!r}: token endpoint failing, retrying later", wait
            )

    async def _refresh(self, trigger: Trigger, *, waiter: bool) -> Token:
        task = self._inflight
        if task is None:
            task = asyncio.create_task(self._fetch(trigger), name=f"refresh:{self.name}")
            task.add_done_callback(_consume)
            self._inflight = task
        elif waiter:
            self._coalesced.inc()
        return await asyncio.shield(task)

    async def _obtain_guarded(self, trigger: Trigger) -> Token:
        """A provider bug (any unexpected exception) is a failed call with backoff, never a
        dead refresh loop."""
        try:
            return await self._obtain(trigger)
        except (GrantFailed, GrantRejected, SharedStateDown, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._log.error("token_provider_error", error=type(exc).__name__)
            raise GrantFailed(f"internal error ({type(exc).__name__})") from None

    async def _fetch(self, trigger: Trigger) -> Token:
        started = time.perf_counter()
        try:
            token = await self._obtain_guarded(trigger)
            if self._misconfigured:   # the issuer's metadata is there now
                self._unauthenticated = self._misconfigured = False
                self._metrics.provider_authenticated.labels(self.name).set(1)
            self._failures = 0
            self._next_attempt = 0.0
            self._last_error = None
            self._shared_problem = None
            return token
        except SharedStateDown as exc:
            if self._shared_problem is None:
                self._log.warning(log.TOKEN_REFRESH_FAILED, trigger=trigger, grant="shared",
                                  error=exc.detail, retry_in_s=exc.retry_after)
            self._shared_problem = exc.detail
            self._next_attempt = self._clock.monotonic() + exc.retry_after
            raise
        except GrantRejected as exc:
            if self._calls.grantor.interactive and not isinstance(exc, DiscoveryFailed):
                # No refresh token, or a rejected one: a person logs in again, never a loop.
                self._become_login_required(exc.reason, exc.grant)
                await self._clear_rejected_login()
                raise self._login_error() from None
            self._become_unauthenticated(exc.reason, exc.grant,
                                         misconfigured=isinstance(exc, DiscoveryFailed))
            raise self._unauthenticated_error() from None
        except GrantFailed as exc:
            detail = "token endpoint failing"
            if self._store is not None and exc.grant == self._store.adopted_grant:
                detail = exc.reason   # the lock, not the endpoint
            self._failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (self._failures - 1))
            delay = min(BACKOFF_MAX, delay * self._rng.uniform(1.0, 1.25))
            delay = max(delay, exc.retry_after or 0.0)
            self._next_attempt = self._clock.monotonic() + delay
            self._last_error = exc.reason
            self._log.warning(log.TOKEN_REFRESH_FAILED, trigger=trigger, grant=exc.grant,
                              error=exc.reason, retry_in_s=round(delay, 2),
                              failures=self._failures)
            raise TokenUnavailable(self.name, f"provider {self.name!r}: {detail}", delay) from None
        finally:
            self._inflight = None
            self._calling = False
            self._metrics.token_refresh_duration.labels(self.name).observe(
                time.perf_counter() - started)
            self._wake.set()

    def _login_error(self) -> LoginRequired:
        return LoginRequired(self.name, f"provider {self.name!r} needs a person to log in: "
                             f"run: tokenproxy login {self.name}")

    def _become_login_required(self, reason: str, grant: str | None) -> None:
        """Stuck until `tokenproxy login` stores new tokens, which _run picks up."""
        self._unauthenticated = self._login_required = True
        # Not taken back from the store: only a login's new tokens end this state.
        self._dropped = None if self._token is None else self._token.value
        self._token = None
        if self._refresh_token:
            self._forget_refresh()   # rejected, or logged out: never presented again
        self._last_error = f"run: tokenproxy login {self.name}"
        self._metrics.provider_authenticated.labels(self.name).set(0)
        self._metrics.token_expiry.labels(self.name).set(0)
        self._log.warning(log.LOGIN_REQUIRED, reason=reason, grant=grant,
                          next_step=f"tokenproxy login {self.name}")

    def _pick_up_login(self, stored: StoredTokens) -> None:
        """What `tokenproxy login` stored, if it did: taken, and the provider serves again."""
        fresh_refresh = (stored.refresh_token is not None
                         and _seed(stored.refresh_token) != self._rejected_refresh)
        fresh_access = stored.access_token is not None and stored.access_token != self._dropped
        if not (fresh_refresh or fresh_access):
            return   # what was there when the login ended (or nothing)
        adopted = self._adopt_stored(stored) if fresh_access else None
        if fresh_refresh:
            self._refresh_token = stored.refresh_token
            self._rejected_refresh = None
        if adopted is None and not fresh_refresh:
            return
        self._unauthenticated = self._login_required = False
        self._last_error = None
        self._failures = 0
        self._next_attempt = 0.0
        self._metrics.provider_authenticated.labels(self.name).set(1)
        if self._store is not None:
            self._calls.count("manual", self._store.adopted_grant, "success")
            self._log.info(log.TOKEN_REFRESHED, trigger="manual",
                           grant=self._store.adopted_grant, expires_in=self._rounded_lifetime(),
                           account=self._account)

    def _stored_newer(self, stored: StoredTokens) -> bool:
        """Written by someone else since we last wrote or took it: by version where the
        store keeps one, else by what the entry is (the state file keeps no version, and a
        time compare loses a write that waited for the lock behind ours)."""
        if self._store is not None and self._store.fenced:
            return stored.version != self._version
        return _mark(stored) != self._last_mark

    async def _wait(self, seconds: float | None) -> None:
        """_nap; a provider a person logs in to also looks at the store every LOGIN_POLL
        meanwhile, where `tokenproxy login` and `logout` (here or on another machine sharing
        the state) leave their word."""
        if not self._calls.grantor.interactive:
            await self._nap(seconds)
            return
        await self._nap(LOGIN_POLL if seconds is None else min(seconds, LOGIN_POLL))
        await self._sync_with_store()

    async def _sync_with_store(self) -> None:
        store = self._store
        if store is None or self._inflight is not None:
            return
        try:
            stored = await store.read(self._key)
        except SharedStateUnavailable:
            return
        if stored is None or self._inflight is not None:
            return   # a refresh began meanwhile: it re-reads under the lock itself
        if self._login_required:
            self._pick_up_login(stored)
            return
        if not self._stored_newer(stored):
            return
        if not stored.access_token and not stored.refresh_token:
            self._become_login_required("logged out", None)   # here or elsewhere
        elif self._token is None or stored.access_token != self._token.value:
            self._adopt_stored(stored)   # a login as someone else, another replica's refresh

    async def _clear_rejected_login(self) -> None:
        """The refresh token was rejected: the stored entry says so too (tokens gone, who
        logged in kept), so that `status`, `login` and a restart agree with this daemon."""
        store = self._store
        if store is None or self._rejected_refresh is None:
            return
        def cleared(stored: StoredTokens | None) -> StoredTokens | None:
            if (stored is None or stored.refresh_token is None
                    or _seed(stored.refresh_token) != self._rejected_refresh):
                return None   # a login stored since: kept
            return StoredTokens(obtained_at=_after(self._clock, stored),
                                account=stored.account, version=stored.version)

        with contextlib.suppress(SharedStateUnavailable, StateLockTimeout, StoreWriteFailed):
            written = await self._replace_stored(cleared)
            if written is not None:
                self._last_mark = _mark(written[1])
                self._obtained_wall = written[1].obtained_at

    async def _replace_stored(
        self, make: Callable[[StoredTokens | None], StoredTokens | None],
    ) -> tuple[StoredTokens | None, StoredTokens] | None:
        """Under the provider's lock, the entry *make* builds from the stored one written in
        its place (read again and retried when a fenced store refused the write: another
        holder wrote meanwhile). Returns (what was stored, what was written), or None when
        *make* wrote nothing."""
        store = self._store
        assert store is not None
        for _ in range(3):
            async with store.locked(self._key, self._lock_timeout):
                stored = await store.read(self._key)
                entry = make(stored)
                if entry is None:
                    return None
                version = await store.write(self._key, entry)
                if version is not None:
                    if store.fenced:
                        self._version = version
                    return stored, entry
        raise StoreWriteFailed("the shared state kept refusing the write")

    @property
    def key(self) -> str:
        """Where the store keeps this provider's tokens."""
        return self._key

    async def store_logout(self) -> StoredTokens | None:
        """`tokenproxy logout`: an entry without tokens in place of the stored ones, which it
        returns (their refresh token is the one to revoke: read under the same lock)."""
        assert self._store is not None, "an interactive provider keeps its tokens in a store"
        written = await self._replace_stored(lambda stored: StoredTokens(
            obtained_at=_after(self._clock, stored),
            account=None if stored is None else stored.account,
            version=0 if stored is None else stored.version))
        assert written is not None
        return written[0]

    async def store_login(self, grant: Grant, account: str | None) -> None:
        """A login a person completed (`tokenproxy login`): stored where the daemon keeps
        this provider's tokens, under its lock, in place of what was there."""
        assert self._store is not None, "an interactive provider keeps its tokens in a store"
        self._account = account

        def logged_in(stored: StoredTokens | None) -> StoredTokens:
            now_wall = _after(self._clock, stored)
            life = lifetime(grant.expires_in, grant.access_token, now_wall)
            return StoredTokens(grant.access_token, None if life is None else now_wall + life,
                                grant.refresh_token, now_wall, None, account,
                                version=0 if stored is None else stored.version)

        written = await self._replace_stored(logged_in)
        assert written is not None
        entry = written[1]
        life = None if entry.expires_at is None else entry.expires_at - entry.obtained_at
        self._install(grant.access_token, grant.refresh_token, life, self._clock.monotonic(),
                      entry.obtained_at)

    def _become_unauthenticated(self, reason: str, grant: str | None, *,
                                misconfigured: bool = False) -> None:
        self._unauthenticated = True
        self._misconfigured = misconfigured
        self._token = None
        self._last_error = reason
        if misconfigured:
            self._next_attempt = self._clock.monotonic() + BACKOFF_MAX
        self._metrics.provider_authenticated.labels(self.name).set(0)
        self._metrics.token_expiry.labels(self.name).set(0)
        self._log.warning(log.TOKEN_REFRESH_FAILED, grant=grant, error=reason,
                          failures=self._failures + 1)
        self._log.error(log.PROVIDER_MISCONFIGURED if misconfigured
                        else log.PROVIDER_UNAUTHENTICATED, error=reason)

    # -- one exchange ------------------------------------------------------------------------

    async def _obtain(self, trigger: Trigger) -> Token:
        stale, store = self._token, self._store
        if store is None:
            return await self._obtain_locked(trigger, stale, None)
        try:
            async with store.locked(self._key, self._lock_timeout):
                return await self._obtain_locked(trigger, stale, store)
        except StateLockTimeout as exc:
            if store.fenced and not self._spends_refresh():
                # A lock nobody releases (set by hand, without a lease) must not stop a grant
                # that spends nothing: get one alone.
                self._log.warning("shared_state_lock_stuck", next_step="local grant")
                return await self._obtain_locked(trigger, stale, None)
            self._calls.count(trigger, store.adopted_grant, "error")
            failed = GrantFailed(str(exc))
            failed.grant = store.adopted_grant
            raise failed from None
        except SharedStateUnavailable as exc:
            # Raised before any token-endpoint call (locking, reading, marking), never after.
            spends = self._spends_refresh()
            if isinstance(exc, SharedStateUnreadable):
                raise SharedStateDown(self.name, f"provider {self.name!r}: {exc}",
                                      SHARED_RETRY) from None
            if spends:
                raise SharedStateDown(
                    self.name, f"provider {self.name!r}: {exc}; its refresh token is spent "
                    "only under the shared lock", SHARED_RETRY) from None
            return await self._obtain_locked(trigger, stale, None)   # a local grant

    def _spends_refresh(self) -> bool:
        return bool(self._refresh_token) and self._calls.grantor.can_refresh

    async def _obtain_locked(self, trigger: Trigger, stale: Token | None,
                             store: TokenStore | None) -> Token:
        version = 0
        if store is not None:
            # Re-read under the lock: another process may have refreshed (and rotated) already.
            stored = await store.read(self._key)
            if stored is not None:
                version = stored.version
                if (self._calls.grantor.interactive and not stored.access_token
                        and not stored.refresh_token and self._stored_newer(stored)):
                    # Logged out since (here or elsewhere): the refresh token in memory is
                    # not spent to undo it.
                    raise LoginNeeded("logged out")
                adopted = self._adopt_stored(stored, stale=stale)
                if adopted is not None:
                    self._calls.count(trigger, store.adopted_grant, "success")
                    self._log.info(log.TOKEN_REFRESHED, trigger=trigger,
                                   grant=store.adopted_grant, expires_in=self._rounded_lifetime())
                    return adopted
            if store.fenced:
                await self._doubt_refresh(store, stored, version)
        # expires_in counts from when the issuer answered, which is after we asked: timing the
        # lifetime from the request (not the answer) keeps our expiry no later than the issuer's.
        if self._calls.grantor.interactive and not self._refresh_token:
            raise LoginNeeded("no refresh token: nobody has logged in (or the last login "
                              "ended)")
        now_mono, now_wall = self._clock.monotonic(), self._clock.time()
        self._calling = True
        grant, used_refresh, grant_type = await self._calls.exchange(
            trigger, self._refresh_token, self._forget_refresh)
        # RFC 6749 section 6: a refresh answer without a refresh token keeps the old one.
        refresh_token = grant.refresh_token or used_refresh
        life = lifetime(grant.expires_in, grant.access_token, now_wall)
        if life is None:
            life = self._default_lifetime
        # The rotated refresh token is stored before the new access token is used.
        entry = StoredTokens(grant.access_token, None if life is None else now_wall + life,
                             refresh_token, now_wall, self._entry_seed(), self._account,
                             version=version)
        if store is not None and not await self._persist(store, entry):
            return await self._fenced_out(trigger, store, grant.access_token, refresh_token,
                                          life, now_mono, now_wall)
        token = self._install(grant.access_token, refresh_token, life, now_mono, now_wall)
        if self._subject is not None:
            self._subject.settle()   # this token is the one exchanged from what it asked
        if grant.expires_in_ignored:
            self._log.warning("expires_in_ignored", reason="not a finite positive number")
        self._log.info(log.TOKEN_REFRESHED, trigger=trigger, grant=grant_type,
                       expires_in=self._rounded_lifetime())
        return token

    def _rounded_lifetime(self) -> float | None:
        return None if self._lifetime is None else round(self._lifetime, 1)

    def _entry_seed(self) -> str | None:
        """What a stored entry is tied to: the configured refresh token's fingerprint, or,
        for a token exchanged from another provider's, that token's (a refresh token is
        never kept for those grants)."""
        if self._subject is not None:
            return _seed(self._subject.asking)
        return self._config_seed

    def _forget_refresh(self) -> None:
        """The refresh token was rejected: never presented again, not even when the state
        file (ours, written before, or another process's) still holds it."""
        self._rejected_refresh = _seed(self._refresh_token)
        self._refresh_token = None

    def _install(self, access: str, refresh_token: str | None, life: float | None,
                 now_mono: float, now_wall: float) -> Token:
        self._redactor.track(self.name, access)
        if refresh_token:
            self._redactor.track(self.name + ":refresh", refresh_token)
        self._generation += 1
        token = Token(access, None if life is None else now_mono + life, self._generation)
        self._token = token
        self._lifetime = life
        self._obtained_mono, self._obtained_wall = now_mono, now_wall
        self._refresh_token = refresh_token
        self._metrics.token_expiry.labels(self.name).set(0 if life is None else now_wall + life)
        self._metrics.provider_authenticated.labels(self.name).set(1)
        self._tell_watchers()
        return token

    async def _doubt_refresh(self, store: TokenStore, stored: StoredTokens | None,
                             version: int) -> None:
        """Before spending a refresh token that replicas share: not one a vanished holder had
        begun spending, nor one from memory when the shared state lost our entry (another
        replica may have rotated it since). A provider that can log in does so instead."""
        refresh = self._refresh_token
        if not refresh or not self._calls.grantor.can_refresh:
            return
        seed = _seed(refresh)
        if stored is not None and stored.spending == seed:
            doubt = "another replica began spending it and did not finish"
        elif self._version > 0 and (stored is None or stored.access_token is None):
            doubt = "the shared state lost this provider's entry"
        else:
            assert seed is not None
            await store.mark_spending(self._key, seed, version)
            return
        if self._calls.grantor.can_login:
            self._log.warning("refresh_token_in_doubt", reason=doubt, next_step="login")
            self._forget_refresh()
        else:
            self._log.warning("refresh_token_in_doubt", reason=doubt,
                              next_step="spend it: this provider cannot log in")
            assert seed is not None
            await store.mark_spending(self._key, seed, version)

    async def _persist(self, store: TokenStore, entry: StoredTokens) -> bool:
        """False only when a fenced store refused the write: newer tokens are stored."""
        self._last_mark = _mark(entry)
        try:
            version = await store.write(self._key, entry)
        except StoreWriteFailed as exc:
            # The new refresh token lives on in memory; the next refresh writes again.
            self._log.error("state_write_failed", error=str(exc))
            return True
        if version is None:
            return False
        self._version = version
        return True

    async def _fenced_out(self, trigger: Trigger, store: TokenStore, access: str,
                          refresh_token: str | None, life: float | None, now_mono: float,
                          now_wall: float) -> Token:
        """Our lease ran out mid-call and another replica stored newer tokens: take those.
        Ours are valid too, and serve only when the stored ones cannot be read or used."""
        self._log.warning("shared_state_write_fenced", grant=store.adopted_grant)
        with contextlib.suppress(SharedStateUnavailable):
            stored = await store.read(self._key)
            if stored is not None and (adopted := self._adopt_stored(stored)) is not None:
                self._calls.count(trigger, store.adopted_grant, "success")
                return adopted
        return self._install(access, refresh_token, life, now_mono, now_wall)

    def _adopt_stored(self, stored: StoredTokens, *, stale: Token | None = None) -> Token | None:
        """Take what another process (or our previous life) wrote. Returns the adopted access
        token when it is newer than *stale* and not itself due for a refresh."""
        if stored.seed != self._config_seed and self._config_seed is not None:
            return None   # the config carries a new refresh token: it wins over the file
        account = stored.account
        if self._subject is not None and (stored.seed is None
                                          or stored.seed != _seed(self._subject.current())):
            return None   # exchanged from another subject token than the one there is now
        if self._store is not None and self._store.fenced:
            # Another version than the last one seen is another replica's (or Redis lost ours
            # and someone wrote anew): authoritative, whatever the wall clocks say.
            newer = stored.version != self._version
            if newer:
                self._version = stored.version
        else:
            newer = stored.obtained_at >= self._obtained_wall
        if (stored.refresh_token and newer
                and _seed(stored.refresh_token) != self._rejected_refresh):
            self._refresh_token = stored.refresh_token
            self._redactor.track(self.name + ":refresh", stored.refresh_token)
        if not newer or not stored.access_token:
            return None
        if stale is not None and stored.access_token == stale.value:
            return None
        now_mono, now_wall = self._clock.monotonic(), self._clock.time()
        if stored.expires_at is None:
            remaining: float | None = self._default_lifetime
        else:
            life = stored.expires_at - stored.obtained_at
            # Never longer than its lifetime: the writer's clock may run behind ours.
            remaining = min(stored.expires_at - now_wall, life)
            if remaining <= 0 or (self._margin > 0 and remaining <= min(self._margin, life / 2)):
                return None
        self._redactor.track(self.name, stored.access_token)
        self._generation += 1
        token = Token(stored.access_token,
                      None if remaining is None else now_mono + remaining, self._generation)
        self._token = token
        self._lifetime = (None if stored.expires_at is None
                          else stored.expires_at - stored.obtained_at)
        self._obtained_mono = now_mono - (
            0.0 if remaining is None or self._lifetime is None else self._lifetime - remaining)
        self._obtained_wall = stored.obtained_at
        self._metrics.token_expiry.labels(self.name).set(stored.expires_at or 0)
        self._last_mark = _mark(stored)
        if account is not None:
            self._account = account   # only with the tokens it names
        if self._subject is not None:
            self._subject.used = self._subject.current()
        self._tell_watchers()
        return token

    # -- background refresh ------------------------------------------------------------------

    def _due(self) -> float | None:
        """Monotonic time of the next proactive refresh, or None when only demand refreshes."""
        tok = self._token
        if tok is None or tok.expires_at is None or self._lifetime is None or self._margin <= 0:
            return None
        return self._obtained_mono + refresh_delay(self._lifetime, self._margin)

    async def _nap(self, seconds: float | None) -> None:
        """Sleep on the injected clock until *seconds* pass or something changes."""
        self._wake.clear()
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if seconds is not None:
            waiters.append(asyncio.ensure_future(self._clock.sleep(seconds)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _run(self) -> None:
        while True:
            if self._login_required:
                await self._wait(LOGIN_POLL)
                continue
            if self._unauthenticated and not self._misconfigured:
                await self._nap(None)   # only new credentials (a reload) help
                continue
            if self._inflight is not None:
                with contextlib.suppress(*_REFRESH_ERRORS):
                    await asyncio.shield(self._inflight)
                continue
            now = self._clock.monotonic()
            if now < self._next_attempt:
                await self._wait(self._next_attempt - now)
                continue
            tok = self._token
            if tok is not None and self._subject_moved():
                with contextlib.suppress(*_REFRESH_ERRORS):
                    await self._refresh("subject", waiter=False)
                continue
            if self._misconfigured:
                # Looked at again every BACKOFF_MAX: an issuer that answered 404 may have been
                # one still starting behind its ingress. Requests get 502 meanwhile.
                with contextlib.suppress(*_REFRESH_ERRORS):
                    await self._refresh("initial" if self._generation == 0 else "expiry",
                                        waiter=False)
                continue
            if tok is None or tok.expired(now):
                if tok is not None and self._margin <= 0 and self._shared_problem is None:
                    await self._wait(None)   # demand-only: a request will refresh it
                    continue
                trigger: Trigger = "initial" if tok is None and self._generation == 0 else "expiry"
                with contextlib.suppress(*_REFRESH_ERRORS):
                    await self._refresh(trigger, waiter=False)
                continue
            due = self._due()
            if due is None or now < due:
                await self._wait(None if due is None else due - now)
                continue
            with contextlib.suppress(*_REFRESH_ERRORS):
                await self._refresh("expiry", waiter=False)


def _consume(task: asyncio.Task[Token]) -> None:
    """Mark a refresh's exception as seen even when every waiter was cancelled."""
    if not task.cancelled():
        task.exception()
