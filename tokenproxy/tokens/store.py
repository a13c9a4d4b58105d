"""Where a TokenManager keeps its tokens beyond its own memory: the state file (one machine,
``flock``) or Redis (replicas on many machines). Both lock a provider identity around a
refresh and re-read under the lock, so a rotating refresh token is spent once.

The manager sees only TokenStore; the two stores differ in what can fail. The file fails
rarely and locally; Redis can be away for a while, which ``SharedStateUnavailable`` reports
(raised by ``locked`` and ``read`` only: writing and unlocking never raise it, so a token
already obtained is never thrown away).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Final, Protocol

from tokenproxy.tokens.state import StateFileError, StateStore, StoredTokens, identity_key

# The grant label of tokens another process (or replica) obtained and this one adopted.
STATE_FILE: Final = "state_file"
SHARED: Final = "shared"


class SharedStateUnavailable(Exception):
    """Redis did not answer (in time); the message says which operation and why, never the
    URL's password or a token."""


class SharedStateUnreadable(SharedStateUnavailable):
    """Redis answers, but holds an entry this replica cannot open (another encryption key, or
    none). A configuration problem: no replica may go on alone with the provider meanwhile,
    or they would drift apart silently."""


class LeaseLost(SharedStateUnavailable):
    """The refresh lock ran out (or the entry changed) before the call: another replica may
    be refreshing now, so this one does not spend the refresh token."""


class StoreWriteFailed(Exception):
    """Nothing could be written; the new tokens live on in memory and the next refresh
    writes again."""


class TokenStore(Protocol):
    @property
    def adopted_grant(self) -> str:
        """The grant label of tokens adopted from this store."""

    @property
    def fenced(self) -> bool:
        """Whether writes carry a version, and a stale writer can lose (Redis)."""

    @property
    def lock_wait(self) -> float:
        """How long a lock may stay taken by a holder that died: waiting less would report a
        dead holder's lease as a failure."""

    def key_for(self, provider: str, identity: Mapping[str, str]) -> str: ...

    async def close(self) -> None: ...

    async def read(self, key: str) -> StoredTokens | None: ...

    def locked(self, key: str, wait: float) -> AbstractAsyncContextManager[None]: ...

    async def mark_spending(self, key: str, refresh_seed: str, version: int) -> None:
        """Record, before the call, that the stored refresh token is being spent: a holder
        that vanishes mid-call leaves the mark, and the next one does not spend it again.
        Raises LeaseLost when this holder's lock, or the *version* it read, is gone."""

    async def write(self, key: str, entry: StoredTokens) -> int | None:
        """Store *entry* if the stored version is still ``entry.version`` (the one read under
        the lock); returns the new version. None when a newer one was written meanwhile: it
        must not be replaced. Raises StoreWriteFailed when nothing could be written."""


class FileStore:
    """The state file as a TokenStore: its blocking calls run in threads, so a slow disk
    never stalls the event loop. Its lock is ``flock``, released by the kernel when the
    holder dies, so its writes need no version."""

    adopted_grant = STATE_FILE
    fenced = False
    lock_wait = 0.0   # flock: the kernel releases a dead holder's lock at once

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def key_for(self, provider: str, identity: Mapping[str, str]) -> str:
        return identity_key(provider, identity)

    async def close(self) -> None:
        return None

    async def read(self, key: str) -> StoredTokens | None:
        return await asyncio.to_thread(self.state.read, key)

    def locked(self, key: str, wait: float) -> AbstractAsyncContextManager[None]:
        return self.state.locked(key, wait)

    async def mark_spending(self, key: str, refresh_seed: str, version: int) -> None:
        return None

    async def write(self, key: str, entry: StoredTokens) -> int | None:
        try:
            await asyncio.to_thread(self.state.write, key, entry)
        except StateFileError as exc:
            raise StoreWriteFailed(f"{self.state.path}: {exc}") from None
        return 0


