"""The shared state on Redis: a TokenStore that replicas on many machines share.

Per provider identity two keys: ``<prefix>tokens:<id>``, a hash of the sealed tokens
(``data``), their version (``ver``) and, while a refresh token is being spent, its fingerprint
(``spending``); and ``<prefix>lock:<id>``, the refresh lock. The lock is a lease (``SET NX PX``
with a random owner value naming host and pid) renewed every third of ``lock_ttl`` while its
holder refreshes, and released only by its owner (a Lua compare-and-delete). A holder paused
past its lease can lose it to another replica, so writes are fenced: a Lua script applies one
only if the version is still the one its writer read under the lock.

Every operation is bounded by ``timeout``; a failure marks the state unavailable (metric,
one log line) and a watcher pings once a second until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from tokenproxy import log
from tokenproxy.config import SharedStateConfig
from tokenproxy.config.shared_state import redacted_url
from tokenproxy.config.values import digest
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.shared.sealing import Sealer, Unreadable
from tokenproxy.tokens.state import StateLockTimeout, StoredTokens
from tokenproxy.tokens.store import (
    SHARED,
    LeaseLost,
    SharedStateUnavailable,
    SharedStateUnreadable,
    StoreWriteFailed,
)

T = TypeVar("T")

# Entries outlive any sensible refresh-token lifetime of an idle provider, then go: a config
# change (a new identity) leaves its old entry behind.
ENTRY_TTL_MS: Final = 30 * 24 * 3600 * 1000
WATCH_INTERVAL: Final = 1.0
# Sealed tokens are a few KiB; more is not ours, and would stall the event loop to parse.
MAX_ENTRY: Final = 64 * 1024
MARK_BYTES: Final = 64
LOCK_POLL_FIRST: Final = 0.005
LOCK_POLL_MAX: Final = 0.1

# Entry checks done in Redis, so a hostile entry costs neither transfer nor parsing here:
# {version, data, spending} or {error, size}. Versions: -1 not a hash, -2 not a number.
_READ: Final = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {0, false, false} end
if kind ~= 'hash' then return {-1, false, false} end
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if ver == nil or ver ~= ver or ver < 0 or ver > 9007199254740991 then return {-2, false, false} end
local size = redis.call('HSTRLEN', KEYS[1], 'data')
if size > tonumber(ARGV[1]) or redis.call('HSTRLEN', KEYS[1], 'spending') > tonumber(ARGV[2]) then
  return {-3, false, false}
end
return {ver, redis.call('HGET', KEYS[1], 'data'), redis.call('HGET', KEYS[1], 'spending')}
"""
_MARK: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'ver') or '0') ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'spending', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
_UNREADABLE: Final = {-1: "not a hash", -2: "its version is not a number",
                      -3: f"larger than {MAX_ENTRY // 1024} KiB"}
_WRITE: Final = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if cur ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'ver', ARGV[4], 'data', ARGV[2])
redis.call('HDEL', KEYS[1], 'spending')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return tonumber(ARGV[4])
"""
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_UNLOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _bound(name: str, version: int) -> bytes:
    """The associated data a value is sealed with: its key name and its version."""
    return f"{name}#{version}".encode()


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _reason(exc: BaseException, timeout: float) -> str:
    """Why an operation failed, in words that carry no URL, password or value."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, AuthenticationError):
        return "authentication failed"
    if isinstance(exc, ResponseError):
        return "refused the command: " + str(exc).split(" ", 1)[0]
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return "connection failed" if "onnect" in type(exc).__name__ else type(exc).__name__


class RedisStore:
    """Implements TokenStore on Redis (see the module docstring)."""

    adopted_grant = SHARED
    fenced = True
    lock_wait: float

    def __init__(self, cfg: SharedStateConfig, metrics: Metrics, *,
                 rng: random.Random | None = None) -> None:
        self.where = redacted_url(cfg.redis_url.value)
        self._prefix = cfg.key_prefix
        self._ttl_ms = max(1, int(cfg.lock_ttl * 1000))
        self._lock_ttl = cfg.lock_ttl
        self._timeout = cfg.timeout
        self.lock_wait = cfg.lock_ttl + cfg.timeout
        self._held: dict[str, str] = {}   # key -> owner value of the locks this store holds
        self._sealer = Sealer(cfg.encryption_keys)
        self._stats = metrics.shared_state()
        self._rng = rng or random.Random()  # noqa: S311 - poll jitter, not cryptography
        self._log = log.get_logger(shared_state=self.where)
        extra: dict[str, Any] = {}
        if cfg.ca_file is not None:   # rediss:// only (the config says so)
            extra["ssl_ca_certs"] = str(cfg.ca_file)
        self._redis = aioredis.Redis.from_url(
            cfg.redis_url.value, socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, **extra)
        self._read_script = self._redis.register_script(_READ)
        self._mark_script = self._redis.register_script(_MARK)
        self._write_script = self._redis.register_script(_WRITE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._unlock_script = self._redis.register_script(_UNLOCK)
        self._up: bool | None = None   # not known before the first answer
        self._watcher: asyncio.Task[None] | None = None
        self._stats.up.set(0)

    @property
    def encrypts(self) -> bool:
        return self._sealer.encrypts

    # -- health ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Ping once, so the metric and /readyz tell at once; Redis being away is no reason not
        to start (valid tokens and local grants keep working)."""
        with contextlib.suppress(SharedStateUnavailable):
            await self._op("connect", self._redis.ping)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    async def _op(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                result = await call()
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                # A key of another type where ours should be: a problem of that entry, not
                # an outage of the whole shared state (READONLY, OOM, NOPERM are, below).
                self._stats.errors.labels(operation).inc()
                self._came_up()
                raise SharedStateUnreadable(
                    f"shared state {self.where}: {_reason(exc, self._timeout)}") from None
            reason = _reason(exc, self._timeout)
            self._went_down(operation, reason)
            raise SharedStateUnavailable(f"shared state {self.where}: {reason}") from None
        except (RedisError, OSError, TimeoutError) as exc:
            reason = _reason(exc, self._timeout)
            self._went_down(operation, reason)
            raise SharedStateUnavailable(f"shared state {self.where}: {reason}") from None
        self._came_up()
        return result

    def _went_down(self, operation: str, reason: str) -> None:
        self._stats.errors.labels(operation).inc()
        if self._up is not False:
            self._log.error(log.SHARED_STATE_UNAVAILABLE, operation=operation, error=reason)
        self._up = False
        self._stats.up.set(0)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="shared-state-watch")

    def _came_up(self) -> None:
        if self._up is False:
            self._log.info(log.SHARED_STATE_RESTORED)
        self._up = True
        self._stats.up.set(1)

    async def _watch(self) -> None:
        """While Redis is away, ping it, so health shows again without waiting for traffic."""
        while self._up is False:
            await asyncio.sleep(WATCH_INTERVAL)
            with contextlib.suppress(SharedStateUnavailable):
                await self._op("connect", self._redis.ping)

    # -- keys --------------------------------------------------------------------------------

    def key_for(self, provider: str, identity: Mapping[str, str]) -> str:
        """The grant's identity alone (not the provider's name): replicas whose configs name
        it differently still share, and other credentials never do."""
        return digest(dict(identity), 32)

    def _tokens_key(self, key: str) -> str:
        return f"{self._prefix}tokens:{key}"

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    # -- TokenStore --------------------------------------------------------------------------

    async def read(self, key: str) -> StoredTokens | None:
        name = self._tokens_key(key)
        version, data, spending = await self._op(
            "read", lambda: self._read_script(keys=[name], args=[MAX_ENTRY, MARK_BYTES]))
        version = int(version)
        if version < 0:
            self._unreadable(name, _UNREADABLE.get(version, "unknown contents"))
        # Bytes, as the client does not decode responses; _text only satisfies typing.
        mark = _text(spending) if spending else None
        if data is None:
            if version == 0 and mark is None:
                return None
            return StoredTokens(version=version, spending=mark)   # the tokens were lost
        try:
            entry = StoredTokens.from_json(self._sealer.open(
                data if isinstance(data, bytes) else data.encode(), _bound(name, version)))
        except Unreadable as exc:
            self._unreadable(name, str(exc))
        except (ValueError, TypeError, RecursionError):
            entry = None
        if entry is None:
            self._unreadable(name, "unknown contents")
        return StoredTokens(entry.access_token, entry.expires_at, entry.refresh_token,
                            entry.obtained_at, entry.seed, entry.account, version=version,
                            spending=mark)

    def _unreadable(self, name: str, reason: str) -> NoReturn:
        self._stats.errors.labels("decrypt").inc()
        self._log.error("shared_state_unreadable", key=name, error=reason)
        raise SharedStateUnreadable(f"shared state entry {name} unreadable: {reason} (fix or "
                                    "delete it)")

    @contextlib.asynccontextmanager
    async def locked(self, key: str, wait: float) -> AsyncIterator[None]:
        # Real time (asyncio's clock), not the daemon's injected one: the lease runs out in
        # Redis, by Redis's clock, whatever the daemon's clock says.
        name = self._lock_key(key)
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        pause = LOCK_POLL_FIRST
        while not await self._op(
                "lock", lambda: self._redis.set(name, owner, nx=True, px=self._ttl_ms)):
            if loop.time() - started >= wait:
                raise StateLockTimeout("another replica holds the refresh lock too long")
            await asyncio.sleep(pause * self._rng.uniform(0.5, 1.5))
            pause = min(LOCK_POLL_MAX, pause * 2)
        self._stats.lock_wait.observe(loop.time() - started)
        renewer = asyncio.create_task(self._renew(name, owner), name="shared-state-renew")
        self._held[key] = owner
        try:
            yield
        finally:
            self._held.pop(key, None)
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            # Not released (Redis away): the lease runs out on its own.
            with contextlib.suppress(SharedStateUnavailable):
                await self._op("unlock", lambda: self._unlock_script(keys=[name], args=[owner]))

    async def _renew(self, name: str, owner: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            try:
                held = await self._op(
                    "renew", lambda: self._renew_script(keys=[name], args=[owner, self._ttl_ms]))
            except SharedStateUnavailable:
                continue   # the write is fenced anyway
            if not held:
                self._log.warning("shared_state_lease_lost")
                return

    async def mark_spending(self, key: str, refresh_seed: str, version: int) -> None:
        names = [self._tokens_key(key), self._lock_key(key)]
        owner = self._held.get(key, "")
        marked = await self._op("mark", lambda: self._mark_script(
            keys=names, args=[owner, version, refresh_seed, ENTRY_TTL_MS]))
        if not marked:
            self._log.warning("shared_state_lease_lost", before="the token-endpoint call")
            raise LeaseLost("the refresh lock ran out before the call; another replica may be "
                            "refreshing")

    async def write(self, key: str, entry: StoredTokens) -> int | None:
        name = self._tokens_key(key)
        # A new entry starts at a random version, not 1: after Redis lost its data, a replica
        # that remembers version n must not take another's new entry n for its own.
        after = entry.version + 1 if entry.version else secrets.randbits(40) + 1
        # Sealed for that version: an older value put back alone (by whoever can write Redis
        # but has no key) then does not open.
        blob = self._sealer.seal(entry.to_json(), _bound(name, after))
        try:
            applied = await self._op("write", lambda: self._write_script(
                keys=[name], args=[entry.version, blob, ENTRY_TTL_MS, after]))
        except SharedStateUnavailable as exc:
            raise StoreWriteFailed(str(exc)) from None
        return None if int(applied) < 0 else int(applied)
