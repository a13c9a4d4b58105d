"""The state file: tokens that survive a restart, shared safely between processes.

Write: temp file in the same directory (0600, O_EXCL) -> write -> fsync -> rename -> fsync of the
directory, so after a crash the file holds the old or the new state, never a torn one. Around a
refresh a process takes ``flock`` on ``<state>.lock`` and re-reads the file, so two processes
never spend one rotating refresh token twice. A corrupt file is set aside, never overwritten.

Whoever can write the state file chooses the token the upstream receives, so it is trusted the
way ssh trusts its key files: the file must be a regular file (never a symlink or a FIFO, which
would also block a plain open) owned by this user or root and writable by nobody else, and so
must its directory. Files are opened with O_NOFOLLOW and O_NONBLOCK and checked with fstat.

About 400 lines because the trust checks, the lock and the atomic write all work on the same
directory descriptor and file, and are easier to check side by side than across modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tokenproxy.config.values import digest
from tokenproxy.log import get_logger

SCHEMA_VERSION: Final = 1
STRAY_TEMP_AGE: Final = 60.0
LOCK_POLL: Final = 0.02


def identity_key(provider: str, identity: Mapping[str, str]) -> str:
    """``name:hash`` — a changed token URL, client or user never reuses another's tokens."""
    return f"{provider}:{digest(dict(identity))}"


@dataclass(frozen=True, slots=True)
class StoredTokens:
    """One provider's persisted tokens. Times are Unix wall time (monotonic does not persist)."""

    access_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    refresh_token: str | None = field(default=None, repr=False)
    obtained_at: float = 0.0
    seed: str | None = None   # fingerprint of the configured refresh token this descends from
    # Who logged in (`tokenproxy login`: the ID token's email or name), for `tokenproxy status`.
    account: str | None = None
    # Shared state only (not in the file): the version read, which a write must still find,
    # and the fingerprint of a refresh token a holder began spending and did not replace.
    version: int = field(default=0, compare=False)
    spending: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "refresh_token": self.refresh_token,
            "obtained_at": self.obtained_at,
            "seed": self.seed,
        } | ({} if self.account is None else {"account": self.account})

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
        seed, account = doc.get("seed"), doc.get("account")
        if seed is not None and not isinstance(seed, str):
            return None
        if account is not None and (not isinstance(account, str) or len(account) > 256):
            account = None   # display only: a strange one is dropped, not the tokens
        return cls(access, None if expires is None else float(expires), refresh, float(obtained),
                   seed, account)


class StateFileError(Exception):
    """The state file could not be written; the new state is kept in memory."""


class StateLockTimeout(Exception):
    """Another refresh of the same provider identity held the lock past the deadline."""


class UnsafeStateFile(Exception):
    """A state or lock file (or their directory) that someone else could have written, or that
    is not a regular file: it is neither read nor written."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}: {fix}")
        self.path = path
        self.problem = problem


_KINDS: Final = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                 (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))


_NOT_REGULAR_STATE: Final = "remove it, or set state_path to a regular file"
_NOT_REGULAR_LOCK: Final = "remove it (it is created again as a regular file)"


def _check_type(path: Path, st: os.stat_result, fix: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateFile(path, "is a symbolic link", fix)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special")
        raise UnsafeStateFile(path, f"is {kind}, not a regular file", fix)


def _foreign_write(st: os.stat_result) -> tuple[str, str] | None:
    """Why someone other than this user (or root) could write what *st* describes, and whether
    it is the owner or the mode; None when nobody else can."""
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid}) or root", "owner"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {oct(stat.S_IMODE(st.st_mode))})", "mode"
    return None


def _check_file(path: Path, st: os.stat_result) -> None:
    """Raise UnsafeStateFile unless *st* (not followed through a symlink) is a regular file
    only this user or root can write."""
    _check_type(path, st, _NOT_REGULAR_STATE)
    foreign = _foreign_write(st)
    if foreign is not None:
        problem, what = foreign
        fix = (f"chmod go-w {path}" if what == "mode"
               else f"remove it, or chown it to uid {os.geteuid()}")
        raise UnsafeStateFile(path, problem, fix)


def _open_regular(path: Path, flags: int, dir_fd: int,
                  fix: str) -> tuple[int, os.stat_result]:
    """Open *path*'s name in the directory *dir_fd* without following a symlink or waiting for
    a FIFO's other end; keep it open only when it is a regular file (else *fix* says what to
    do)."""
    try:
        fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:   # O_NOFOLLOW's answer for a symlink
            _check_type(path, os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False), fix)
        raise
    st = os.fstat(fd)
    try:
        _check_type(path, st, fix)
    except UnsafeStateFile:
        os.close(fd)
        raise
    return fd, st


class StateStore:
    """Read, lock and atomically write one state file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutexes: dict[str, asyncio.Lock] = {}
        self._log = get_logger()
        self._cleaned = False
        self._last_said: tuple[str, tuple[tuple[str, Any], ...]] | None = None

    # -- trust -------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise UnsafeStateFile when the state file or its directory must not be trusted. A
        missing one is fine; an unreachable one is left to reading, which warns about it."""
        try:
            with self._directory() as dir_fd:
                st = os.stat(self.path.name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        _check_file(self.path, st)

    @contextlib.contextmanager
    def _directory(self) -> Iterator[int]:
        """The state directory, opened and checked. Files are opened relative to this
        descriptor, so a directory swapped in after the check is never used."""
        folder = self.path.parent
        # Followed: systemd's StateDirectory under DynamicUser is a symlink into private/.
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            foreign = _foreign_write(os.fstat(fd))
            if foreign is not None:
                problem, what = foreign
                fix = (f"chmod go-w {folder}, or set state_path to a private directory"
                       if what == "mode" else
                       f"chown it to uid {os.geteuid()}, or set state_path to a directory of "
                       "this user's")
                raise UnsafeStateFile(self.path, f"its directory {folder} {problem}", fix)
            yield fd
        finally:
            os.close(fd)

    def _once(self, event: str, level: str, **fields: Any) -> None:
        """Log a problem of the file once until it changes: the store is read every second
        for a person's tokens, and the same line each time would drown the log."""
        said = (event, tuple(sorted(fields.items())))
        if said == self._last_said:
            return
        self._last_said = said
        getattr(self._log, level)(event, **fields)

    def _unsafe(self, exc: UnsafeStateFile) -> None:
        # Never the contents: they may hold tokens, and they are someone else's anyway.
        self._once("state_file_unsafe", "error", path=str(exc.path), reason=exc.problem)

    # -- reading -----------------------------------------------------------------------------

    def _set_aside(self, reason: str) -> None:
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, target)
        self._log.warning("state_file_corrupt", path=str(self.path), reason=reason,
                          moved_to=str(target))

    def read_all(self, *, look_only: bool = False) -> dict[str, StoredTokens]:
        """Every provider's entry; a missing file is empty, a corrupt one is set aside (left
        alone with *look_only*: a check must not take the daemon's file away), an unsafe one
        (see check) is logged and read as empty."""
        def read() -> dict[str, StoredTokens]:
            with self._directory() as dir_fd:
                return self._read_all(dir_fd, set_aside=not look_only)

        return self._guarded(read)

    def _guarded(self, read: Callable[[], dict[str, StoredTokens]]) -> dict[str, StoredTokens]:
        """What *read* finds; nothing when the file is missing, unsafe or unreadable."""
        try:
            return read()
        except FileNotFoundError:
            return {}
        except UnsafeStateFile as exc:
            self._unsafe(exc)
            return {}
        except OSError as exc:
            self._once("state_file_unreadable", "warning", path=str(self.path),
                       error=exc.strerror or type(exc).__name__)
            return {}

    def _read_all(self, dir_fd: int, *, set_aside: bool) -> dict[str, StoredTokens]:
        fd, st = _open_regular(self.path, os.O_RDONLY, dir_fd, _NOT_REGULAR_STATE)
        with os.fdopen(fd, "rb") as fh:
            _check_file(self.path, st)
            # Readable by others is only warned about: every write replaces it with a 0600 file.
            if st.st_mode & 0o077:
                self._once("state_file_permissions", "warning", path=str(self.path),
                           mode=oct(st.st_mode & 0o777))
            else:
                self._last_said = None
            raw = fh.read(4 * 1024 * 1024 + 1)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            if set_aside:
                self._set_aside("not JSON")
            return {}
        if (not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION
                or not isinstance(doc.get("providers"), dict)):
            if set_aside:
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
        except UnsafeStateFile as exc:
            raise StateFileError(str(exc)) from None
        except OSError as exc:
            raise StateFileError(exc.strerror or type(exc).__name__) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._write(key, tokens)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, key: str, tokens: StoredTokens) -> None:
        try:
            with self._directory() as dir_fd:
                self._replace(key, tokens, dir_fd)
        except UnsafeStateFile as exc:
            raise StateFileError(str(exc)) from None
        except OSError as exc:
            raise StateFileError(exc.strerror or type(exc).__name__) from None

    def _replace(self, key: str, tokens: StoredTokens, dir_fd: int) -> None:
        # An unsafe file reads as empty here too: its entries are not carried over.
        entries = self._guarded(lambda: self._read_all(dir_fd, set_aside=True))
        entries[key] = tokens
        doc = {"version": SCHEMA_VERSION,
               "providers": {k: v.to_json() for k, v in sorted(entries.items())}}
        data = json.dumps(doc, indent=1).encode()
        self._remove_stray_temps()
        tmp = f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)

    # -- locking -----------------------------------------------------------------------------

    def _lock_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in key)
        return self.path.with_name(f"{self.path.name}.{safe}.lock")

    def _open_lock(self, path: Path) -> int:
        """The lock file, created if need be. Never through a symlink: O_CREAT would create
        its target wherever it points."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._directory() as dir_fd:
            fd, _ = _open_regular(path, os.O_RDWR | os.O_CREAT, dir_fd, _NOT_REGULAR_LOCK)
        return fd

    async def _open_lock_off_loop(self, path: Path) -> int:
        """_open_lock in a thread. A caller cancelled meanwhile does not get the descriptor,
        so it is closed when the thread hands it over, never leaked."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_lock, path))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise

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
                fd = await self._open_lock_off_loop(self._lock_path(key))
            except UnsafeStateFile as exc:
                self._unsafe(exc)   # unlocked, like an unwritable directory below
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


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())
