"""structlog set-up: one JSON object per line on stderr, with redaction before rendering.

Redaction has three layers, because a single missed call site must not leak a token:
values under sensitive keys are masked, ``Bearer ...`` inside any string is masked, and every
secret the process knows (config secrets, current tokens) registered with the Redactor is
replaced wherever it appears. Query strings are cut from ``path`` and ``url`` fields.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# The event names of docs/logging.md; a rename here is a visible, reviewed change.
REQUEST: Final = "request"
TOKEN_REFRESHED: Final = "token_refreshed"
TOKEN_REFRESH_FAILED: Final = "token_refresh_failed"
PROVIDER_UNAUTHENTICATED: Final = "provider_unauthenticated"
PROVIDER_MISCONFIGURED: Final = "provider_misconfigured"
CONFIG_RELOADED: Final = "config_reloaded"
CONFIG_RELOAD_FAILED: Final = "config_reload_failed"
LISTENING: Final = "listening"
SHARED_STATE_UNAVAILABLE: Final = "shared_state_unavailable"
SHARED_STATE_RESTORED: Final = "shared_state_restored"
ASSERTION_EXPIRED: Final = "assertion_expired"
KEY_FILE_READABLE: Final = "key_file_readable"
LOGIN_REQUIRED: Final = "login_required"

MASK: Final = "***"
SENSITIVE_KEYS: Final = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "tokenproxy-key",
    "access_token", "refresh_token", "id_token", "client_secret", "password", "token",
    "client_key", "secret", "query",
})
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=:-]+")
_QUERY_KEYS: Final = frozenset({"path", "url", "target", "location"})
_MIN_SECRET: Final = 4
_MAX_SECRETS: Final = 512

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                  "warning": logging.WARNING, "error": logging.ERROR}


class Redactor:
    """A structlog processor that masks secrets; knows the secret values it was given.

    Config secrets stay for the life of the process (``add``); tokens are tracked per owner
    (``track``), keeping the current and the previous one, so the set stays small however
    many refreshes happen. One compiled pattern matches them all.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._fixed: dict[str, None] = {}
        self._owned: dict[str, list[str]] = {}
        self._pattern: re.Pattern[str] | None = None
        for s in secrets:
            self.add(s)

    def _rebuild(self) -> None:
        values = set(self._fixed)
        for tokens in self._owned.values():
            values.update(tokens)
        if len(values) > _MAX_SECRETS:   # bounded: a misbehaving caller cannot grow it forever
            values = set(sorted(values, key=len, reverse=True)[:_MAX_SECRETS])
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(values, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def add(self, secret: str) -> None:
        """Mask *secret* wherever it appears from now on (short values would mask noise)."""
        if len(secret) < _MIN_SECRET or secret in self._fixed:
            return
        self._fixed[secret] = None
        if len(self._fixed) > _MAX_SECRETS:
            del self._fixed[next(iter(self._fixed))]
        self._rebuild()

    def track(self, owner: str, secret: str) -> None:
        """Mask *owner*'s current token (and its previous one, still in flight somewhere)."""
        if len(secret) < _MIN_SECRET:
            return
        held = self._owned.setdefault(owner, [])
        if secret in held:
            return
        held.append(secret)
        del held[:-2]
        self._rebuild()

    def scrub(self, text: str) -> str:
        text = _BEARER.sub(lambda m: m[1] + m[2] + MASK, text)
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return text

    def _clean(self, key: str, value: Any, depth: int = 0) -> Any:
        low = key.lower()
        if low in SENSITIVE_KEYS:
            return MASK
        if isinstance(value, str):
            if low in _QUERY_KEYS:
                value = value.split("?", 1)[0]
            return self.scrub(value)
        if depth > 8:
            return MASK
        if isinstance(value, dict):
            # Keys are data too (a dict keyed by token would otherwise print it).
            return {(self.scrub(k) if isinstance(k, str) else k): self._clean(str(k), v, depth + 1)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            if len(value) == 2 and all(isinstance(v, str) for v in value):
                # header pairs: mask by the pair's own name
                return [self.scrub(value[0]), self._clean(value[0], value[1], depth + 1)]
            return [self._clean(key, v, depth + 1) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        # Other objects (yarl.URL, exceptions, ...) as text, through the same rules.
        return self._clean(key, str(value), depth)

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if key == "event" and isinstance(value, str):
                event[key] = self.scrub(value)
            else:
                event[key] = self._clean(key, value)
        return event


class _StdlibBridge(logging.Handler):
    """Send records of stdlib loggers (aiohttp, asyncio) through the same redacting pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            # The exception type only: messages and tracebacks can carry request bytes.
            fields["error"] = type(record.exc_info[1]).__name__
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        # structlog knows only the standard levels; a custom one (25, say) would raise here.
        level = max((n for n in _LEVELS.values() if n <= record.levelno), default=logging.DEBUG)
        if record.levelno >= logging.CRITICAL:
            level = logging.CRITICAL
        structlog.get_logger().log(level, message, **fields)


class BatchedWriter:
    """structlog's output: lines written once per event-loop turn instead of once each.

    A proxy logs a line per request; one write and flush per line cost as much as relaying a
    small answer. Lines queued during a loop turn go out together at the start of the next
    turn (call_soon), in order, before the loop polls again; without a running loop (the CLI,
    start-up) each line is written at once. ``flush()`` is also called at exit.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lines: list[str] = []
        self._scheduled = False

    def msg(self, message: str) -> None:
        self._lines.append(message)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        # Swapped, not cleared: a line logged from a worker thread meanwhile is not lost.
        lines, self._lines = self._lines, []
        data = "\n".join(lines) + "\n"
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError):
            pass   # stderr closed (a detached daemon): logging must never take the proxy down


_json_string: Final = json.encoder.encode_basestring_ascii


class AccessLog:
    """The ``request`` event without structlog's per-call pipeline (measured: it cost a fifth
    of a proxied request). Same fields and JSON shape; the path goes through the Redactor's
    rules (query cut, secrets masked); written by the same BatchedWriter, so order holds."""

    def __init__(self, writer: BatchedWriter | None, redactor: Redactor, enabled: bool) -> None:
        self._writer = writer
        self._redactor = redactor
        self.enabled = enabled
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1e6):06d}Z"

    def request(self, *, route: str, method: str, path: str, status: int, duration_ms: float,
                bytes: int, retried: bool) -> None:
        if not self.enabled:
            return
        if self._writer is None:   # console format: the regular pipeline renders it
            get_logger().info(REQUEST, route=route, method=method, path=path, status=status,
                              duration_ms=duration_ms, bytes=bytes, retried=retried)
            return
        # Rendered by hand (json.dumps of the dict cost 9 % of a request): every string is
        # escaped by the json module's own encoder, the numbers are ints and a float.
        esc = _json_string
        self._writer.msg(
            f'{{"route": {esc(route)}, "method": {esc(method)}, '
            f'"path": {esc(self._redactor.scrub(path.split("?", 1)[0]))}, '
            f'"status": {int(status)}, "duration_ms": {float(duration_ms)!r}, '
            f'"bytes": {int(bytes)}, "retried": {"true" if retried else "false"}, '
            f'"event": "request", "level": "info", "timestamp": "{self._timestamp()}"}}'
        )


# The process's logging set-up, like structlog's own configuration: one per process.
_access = AccessLog(None, Redactor(), True)


def access() -> AccessLog:
    """The access log as configured by the last ``configure()``."""
    return _access


def flush() -> None:
    """Write out queued lines now (shutdown, tests)."""
    if _writer is not None:
        _writer.flush()


_writer: BatchedWriter | None = None


def _drop_color_message(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.pop("color_message", None)
    return event


def configure(
    level: str = "info",
    fmt: str = "json",
    *,
    redactor: Redactor,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog (and the stdlib bridge) once per process, before anything logs."""
    out = stream if stream is not None else sys.stderr
    renderer: Processor
    exceptions: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        # ConsoleRenderer needs the traceback as text (a dict one makes it raise TypeError);
        # the plain traceback module shows no locals.
        exceptions = structlog.processors.format_exc_info
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_color_message,
        exceptions,
        redactor,
        renderer,
    ]
    global _access, _writer
    if _writer is not None:
        _writer.flush()
    writer = BatchedWriter(out)
    _writer = writer
    _access = AccessLog(writer if fmt == "json" else None, redactor,
                        _LEVELS[level] <= logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(_LEVELS[level], logging.INFO))
    # aiohttp.access would duplicate our own request event.
    logging.getLogger("aiohttp.access").disabled = True


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


atexit.register(flush)
