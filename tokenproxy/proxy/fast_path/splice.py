"""A body of known length moved between two sockets by splice(2): the bytes never enter
user space (Linux; os.splice, Python 3.10+).

The transports own the sockets, so a relay works on duplicates of their descriptors (the loops
refuse a reader on a descriptor a transport watches): the source transport is paused and the
sink transport's write buffer empty for the whole relay, so neither reads nor writes behind
the other's back. One pipe per relay, of PIPE_SIZE: a slow sink holds at most that much here
(the rest stays in the kernel's socket buffers, and the sender is held back by TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from typing import Final

from tokenproxy.proxy.failures import UpstreamBroke

AVAILABLE: Final = hasattr(os, "splice")   # Linux, Python 3.10+
PIPE_SIZE: Final = 1024 * 1024
# A user past pipe-user-pages-soft (64 MiB of pipes by default: 64 relays at once, when not
# root) gets 8 KiB pipes, at half the rate of the copy path: below this, copy instead.
MIN_PIPE: Final = 64 * 1024
# Bodies shorter than this are copied: a pipe and two duplicates cost more than they save.
SPLICE_MIN: Final = 1024 * 1024
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_MORE: Final = getattr(os, "SPLICE_F_MORE", 4)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# Only plain sockets: a TLS transport says it has a socket too, but its bytes are encrypted.
_PLAIN: Final = frozenset({"TCPTransport", "UnixTransport", "_SelectorSocketTransport"})


class SourceClosed(UpstreamBroke):
    """The source ended (or broke) before the whole body came."""


class SinkClosed(ConnectionError):
    """The sink stopped taking bytes (closed, reset)."""


class SinkStalled(TimeoutError):
    """The sink took nothing for the stall timeout."""


def plain_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor of a plain-socket transport that splice can use, else None."""
    if not AVAILABLE or transport is None or transport.is_closing():
        return None
    if type(transport).__name__ not in _PLAIN:
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


def between(loop: asyncio.AbstractEventLoop, src: asyncio.BaseTransport | None,
            dst: asyncio.BaseTransport | None, count: int, stall: float | None = None, *,
            check_trailing: bool = False) -> Relay | None:
    """A relay of *count* bytes from transport *src* to *dst*, or None where the copy path
    must do: a side that is not a plain socket, or a relay that cannot be made (out of
    descriptors, a pipe too small)."""
    src_fd, dst_fd = plain_fd(src), plain_fd(dst)
    if src_fd is None or dst_fd is None:
        return None
    try:
        return Relay(loop, src_fd, dst_fd, count, stall, check_trailing=check_trailing)
    except OSError:
        return None


class Relay:
    """Move *prefix* (bytes already in user space) then *count* bytes from *src* to *dst*.

    *src* and *dst* are descriptors owned by transports; the relay duplicates them (OSError
    if it cannot, or if its pipe would be smaller than *min_pipe*: the caller copies instead)
    and closes its duplicates and its pipe when it ends (done, failed or stopped). It moves
    nothing before start(). `done` resolves when every byte is written, or fails with
    SourceClosed, SinkClosed or SinkStalled (*stall* seconds waiting for the sink to take
    bytes, when given: a quiet source is not the sink's doing, and is waited for as the copy
    path waits).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, dst: int, count: int,
                 stall: float | None = None, *, check_trailing: bool = False,
                 min_pipe: int = MIN_PIPE) -> None:
        assert AVAILABLE
        self._loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.left = count            # still to read from src
        self.written = 0             # body bytes written to dst (the prefix not counted)
        # With check_trailing, whether src had more waiting (a byte or its end) once the
        # count was read: an answer longer than it said, never to be taken for the next one.
        self.trailing = False
        self._check_trailing = check_trailing
        self._prefix: memoryview | None = None
        self._in_pipe = 0
        self._stall = stall
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = loop.time()
        self._reading = self._writing = False
        self._src = self._dst = self._pr = self._pw = -1
        try:
            self._src = os.dup(src)
            self._dst = os.dup(dst)
            self._pr, self._pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            # Refused past pipe-user-pages-max (or pipe-max-size): the pipe keeps its size.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._pw, _F_SETPIPE_SZ, PIPE_SIZE)
            self._cap = fcntl.fcntl(self._pw, _F_GETPIPE_SZ)
            if self._cap < min_pipe:
                raise OSError(f"a pipe of {self._cap} bytes: the copy path is faster")
        except BaseException:
            self._close_fds()
            raise

    def start(self, prefix: bytes = b"") -> None:
        if prefix:
            self._prefix = memoryview(prefix)
        if self._stall is not None:
            self._timer = self._loop.call_later(self._stall, self._check_stall)
        self._step()

    def stop(self) -> None:
        """End now (idempotent); `done` is cancelled if it was pending."""
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_fds()
        if not self.done.done():
            self.done.cancel()

    @property
    def read(self) -> int:
        """Body bytes taken from src so far (written, or lost in the pipe if stopped)."""
        return self.written + self._in_pipe

    # -- the loop's callbacks ----------------------------------------------------------------

    def _step(self) -> None:
        if self._src < 0:
            return   # stopped
        want_read = want_write = False
        try:
            if self._prefix is not None and not self._write_prefix():
                self._watch(False, True)
                return
            while True:
                moved = False
                if self.left and self._in_pipe < self._cap:
                    try:
                        room = min(self.left, self._cap - self._in_pipe)
                        n = os.splice(self._src, self._pw, room, None, None, _FLAGS)
                    except BlockingIOError:
                        # The socket has nothing, or the pipe has no free slot: only an empty
                        # pipe makes it the socket's doing (a full one waits for the sink).
                        want_read = self._in_pipe == 0
                    except OSError as exc:
                        raise SourceClosed(f"the source broke: {exc.strerror}") from None
                    else:
                        if n == 0:
                            raise SourceClosed("the source closed before the body ended")
                        self.left -= n
                        self._in_pipe += n
                        moved = True
                if self._in_pipe:
                    try:
                        # More to come at once (the source filled the pipe): TCP may hold
                        # a partial segment (MSG_MORE), so the peer gets full-sized segments
                        # rather than one per pipe buffer. Not otherwise: a source that sent
                        # less may pause, and what it sent would wait for the cork timer.
                        more = self.left and self._in_pipe >= self._cap
                        flags = _FLAGS | _MORE if more else _FLAGS
                        n = os.splice(self._pr, self._dst, self._in_pipe, None, None, flags)
                    except BlockingIOError:
                        want_write = True
                    except OSError as exc:
                        raise SinkClosed(exc.errno, exc.strerror) from None
                    else:
                        self._in_pipe -= n
                        self.written += n
                        self._last_write = self._loop.time()
                        moved = True
                if not self.left and not self._in_pipe:
                    self._finish(None)
                    return
                if not moved:
                    break
                want_read = want_write = False
        except (SourceClosed, SinkClosed) as exc:
            self._finish(exc)
            return
        self._watch(want_read, want_write)

    def _write_prefix(self) -> bool:
        prefix = self._prefix
        assert prefix is not None
        while prefix:
            try:
                n = os.write(self._dst, prefix)
            except BlockingIOError:
                self._prefix = prefix
                return False
            except OSError as exc:
                raise SinkClosed(exc.errno, exc.strerror) from None
            prefix = prefix[n:]
            self._last_write = self._loop.time()
        self._prefix = None
        return True

    def _check_stall(self) -> None:
        self._timer = None
        if self._src < 0 or self._stall is None:
            return
        if not self._writing:
            # Not waiting for the sink (a quiet source, or between steps): not its stall.
            self._timer = self._loop.call_later(self._stall, self._check_stall)
            return
        left = self._last_write + self._stall - self._loop.time()
        if left > 0.001:
            self._timer = self._loop.call_later(left, self._check_stall)
            return
        self._finish(SinkStalled())

    # -- plumbing ----------------------------------------------------------------------------

    def _watch(self, read: bool, write: bool) -> None:
        if read != self._reading:
            self._reading = read
            if read:
                self._loop.add_reader(self._src, self._step)
            else:
                self._loop.remove_reader(self._src)
        if write != self._writing:
            self._writing = write
            if write:
                self._last_write = self._loop.time()   # a stall counts from here
                self._loop.add_writer(self._dst, self._step)
            else:
                self._loop.remove_writer(self._dst)

    def _unwatch(self) -> None:
        if self._src >= 0:
            self._watch(False, False)

    def _finish(self, exc: BaseException | None) -> None:
        self._unwatch()
        if exc is None and self._check_trailing:
            self.trailing = not _quiet(self._src)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_fds()
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                # Raised and caught in _step: its traceback holds _step's frame, which holds
                # this relay, whose future holds the exception -- a cycle the owner would
                # extend through its own frames (see exchange.forget_frames).
                exc.__traceback__ = exc.__context__ = None
                self.done.set_exception(exc)
                self.done.exception()   # retrieved: a stopped relay's owner may not look

    def _close_fds(self) -> None:
        for fd in (self._src, self._dst, self._pr, self._pw):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._src = self._dst = self._pr = self._pw = -1


def _quiet(fd: int) -> bool:
    """Nothing waiting on socket *fd*: no byte, no end, no error (a peek; nothing is read)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.detach()     # the descriptor stays the relay's, closed with the others
    return False          # a byte, or the end of the stream
