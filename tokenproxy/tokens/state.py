"""The state file: tokens that survive a restart, shared safely between processes.

Write: temp file in the same directory (0600, O_EXCL) -> write -> fsync -> rename -> fsync of the
directory, so after a crash the file holds the old or the new state, never a torn one. Around a
refresh a process takes ``flock`` on ``<state>.lock`` and re-reads the file, so two processes
never spend one rotating refresh token twice. A corrupt file is set aside, never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tokenproxy.log import get_logger

SCHEMA_VERSION: Final = 1
STRAY_TEMP_AGE: Final = 60.0
LOCK_POLL: Final = 0.02


def identity_key(provider: str, identity: Mapping[str, str]) -> str:
    """``name:hash`` — a changed token URL, client or user never reuses another's tokens."""
    digest = hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()
    return f"{provider}:{digest[:16]}"


@dataclass(frozen=True, slots=True)
class StoredTokens:
    """One provider's persisted tokens. Times are Unix wall time (monotonic does not persist)."""

    access_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    refresh_token: str | None = field(default=None, repr=False)
    obtained_at: float = 0.0
    seed: str | None = None   # fingerprint of the configured refresh token this descends from

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "refresh_token": self.refresh_token,
            "obtained_at": self.obtained_at,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, doc: object) -> StoredTokens | None:
        if not isinstance(doc, dict):
            return None
        access, refresh = doc.get("access_token"), doc.get("refresh_token")
        expires, obtained = doc.get("expires_at"), doc.get("obtained_at", 0.0)
        if access is not None and not isinstance(access, str):
            return None
        if refresh is not None and not isinstance(refresh, str):
            return None
        if expires is not None and (isinstance(expires, bool)
                                    or not isinstance(expires, int | float)):
            return None
        if isinstance(obtained, bool) or not isinstance(obtained, int | float):
            return None
        seed = doc.get("seed")
        if seed is not None and not isinstance(seed, str):
            return None
        return cls(access, None if expires is None else float(expires), refresh, float(obtained),
                   seed)


class StateFileError(Exception):
    """The state file could not be written; the new state is kept in memory."""


class StateLockTimeout(Exception):
    """Another refresh of the same provider identity held the lock past the deadline."""


class StateStore:
    """Read, lock and atomically write one state file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutexes: dict[str, asyncio.Lock] = {}
        self._log = get_logger()
        self._cleaned = False

    # -- reading -----------------------------------------------------------------------------

    def _set_aside(self, reason: str) -> None:
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, target)
        self._log.warning("state_file_corrupt", path=str(self.path), reason=reason,
                          moved_to=str(target))

    def read_all(self) -> dict[str, StoredTokens]:
        """Every provider's entry; a missing file is empty, a corrupt one is set aside."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._log.warning("state_file_unreadable", path=str(self.path),
                              error=exc.strerror or type(exc).__name__)
            return {}
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_mode & 0o077:
                self._log.warning("state_file_permissions", path=str(self.path),
                                  mode=oct(st.st_mode & 0o777))
            raw = fh.read(4 * 1024 * 1024 + 1)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            self._set_aside("not JSON")
            return {}
        if (not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION
                or not isinstance(doc.get("providers"), dict)):
            self._set_aside("unknown schema")
            return {}
        out: dict[str, StoredTokens] = {}
        for key, entry in doc["providers"].items():
            parsed = StoredTokens.from_json(entry)
            if parsed is not None:
                out[str(key)] = parsed
        return out

    def read(self, key: str) -> StoredTokens | None:
        return self.read_all().get(key)

    # -- writing -----------------------------------------------------------------------------

    def _remove_stray_temps(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in self.path.parent.iterdir():
                if entry.name.startswith(f".{self.path.name}.") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > STRAY_TEMP_AGE:
                            entry.unlink()

    def write(self, key: str, tokens: StoredTokens) -> None:
        """Replace one provider's entry, keeping the others'. Blocking (run it in a thread):
        a short whole-file lock covers the read-modify-write, since providers refresh
        independently under their own locks."""
        try:
            fd = self._open_lock(self.path.with_name(self.path.name + ".lock"))
        except OSError as exc:
            raise StateFileError(exc.strerror or type(exc).__name__) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._write(key, tokens)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, key: str, tokens: StoredTokens) -> None:
        entries = self.read_all()
        entries[key] = tokens
        doc = {"version": SCHEMA_VERSION,
               "providers": {k: v.to_json() for k, v in sorted(entries.items())}}
        data = json.dumps(doc, indent=1).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._remove_stray_temps()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateFileError(exc.strerror or type(exc).__name__) from None

    # -- locking -----------------------------------------------------------------------------

    def _lock_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in key)
        return self.path.with_name(f"{self.path.name}.{safe}.lock")

    def _open_lock(self, path: Path) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.asynccontextmanager
    async def locked(self, key: str, wait: float) -> AsyncIterator[None]:
        """Exclusive for one provider identity, across tasks and processes sharing the file.

        Held around a whole refresh (network call included), so it is per identity: one
        provider's slow token endpoint never holds up another's. The wait is bounded: a lock
        that another process keeps longer than *wait* seconds raises StateLockTimeout.
        """
        mutex = self._mutexes.setdefault(key, asyncio.Lock())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            async with asyncio.timeout(wait):
                await mutex.acquire()
        except TimeoutError:
            raise StateLockTimeout("another refresh of this provider is still running") from None
        fd: int | None = None
        try:
            try:
                fd = self._open_lock(self._lock_path(key))
            except OSError as exc:
                # An unwritable state directory must not stop token handling in this process.
                self._log.warning("state_lock_failed", path=str(self._lock_path(key)),
                                  error=exc.strerror or type(exc).__name__)
            while fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        os.close(fd)
                        fd = None
                        raise StateLockTimeout(
                            "another process holds the state file lock too long") from None
                    await asyncio.sleep(LOCK_POLL)
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            mutex.release()


