"""HTTP/1.1 heads as bytes for the fast path: pure functions, the same rules as headers.py.

The fast path works on the raw (name, value) byte pairs llhttp hands it; these functions apply
the header policy of headers.py to them and render the heads it writes. Header bytes are
latin-1 both ways (RFC 9110 section 5.5), so nothing is re-encoded on the way through.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from tokenproxy.proxy.headers import HOP_BY_HOP, MIN_ECHO_TOKEN, REQUEST_ONLY_LOCAL
from tokenproxy.proxy.problem import problem_body

Header = tuple[bytes, bytes]

_HOP: Final = frozenset(n.encode() for n in HOP_BY_HOP)
_LOCAL: Final = frozenset(n.encode() for n in REQUEST_ONLY_LOCAL)
CRLF: Final = b"\r\n"
CHUNKED_END: Final = b"0\r\n\r\n"


def connection_listed(headers: Sequence[Header]) -> frozenset[bytes]:
    """Names listed in Connection (RFC 9110 section 7.6.1), lower-cased."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(p.strip().lower() for p in value.split(b",") if p.strip())
    return frozenset(listed)


def request_headers(
    headers: Sequence[Header],
    *,
    drop: frozenset[bytes],
    auth_header: bytes,
    keep_client_auth: bool,
    preserve_host: bool,
) -> tuple[list[Header], bool, int]:
    """headers.forward_request_headers on byte pairs: (headers for the upstream, client_auth,
    names dropped as invalid)."""
    listed = connection_listed(headers)
    out: list[Header] = []
    client_auth = False
    invalid = 0
    for name, value in headers:
        low = name.lower()
        if not low.replace(b"-", b"").isalnum():   # bytes.isalnum: ASCII letters and digits
            invalid += 1
            continue
        if low == b"host":
            # Before the Connection-listed check: "Connection: Host" must not leave an
            # HTTP/1.1 request without a Host.
            if preserve_host:
                out.append((name, value))
            continue
        if low == b"content-length":
            continue   # framing is ours: the caller writes the length of what it sends
        if low in _HOP or low in drop or low.startswith(b"proxy-") or low in listed:
            continue
        if low in _LOCAL:
            continue
        if low == auth_header:
            if not keep_client_auth:
                continue
            client_auth = True
        out.append((name, value))
    return out, client_auth, invalid


def response_headers(
    headers: Iterable[Header],
    *,
    token: bytes,
    rewrite_location: Callable[[str], str],
) -> list[Header]:
    """headers.forward_response_headers on byte pairs; framing headers are the caller's."""
    headers = list(headers)
    listed = connection_listed(headers)
    echoes_token = len(token) >= MIN_ECHO_TOKEN
    out: list[Header] = []
    for name, value in headers:
        low = name.lower()
        if low in _HOP or low in listed or low.startswith(b"proxy-") or low == b"content-length":
            continue
        if echoes_token and token in value:
            continue
        if low == b"location":
            # The aiohttp path's decoding: bytes survive the round trip unchanged, and a
            # rewritten non-ASCII prefix goes out as UTF-8.
            value = rewrite_location(value.decode("utf-8", "surrogateescape")).encode(
                "utf-8", "surrogateescape")
        out.append((name, value))
    return out


def safe_reason(reason: bytes, token: bytes) -> bytes:
    """The upstream's reason phrase, unless it echoes the token (then the standard one)."""
    if len(token) >= MIN_ECHO_TOKEN and token in reason:
        return b""
    return reason


def render_request(method: bytes, target: bytes, host: bytes | None,
                   headers: Iterable[Header], length: int | None, *, close: bool = False
                   ) -> bytes:
    """The upstream request head up to, not including, the token line and the final CRLF.

    *length* is the body's Content-Length (None: the client sent none); *close* asks the
    upstream to close after answering (proxy/reuse.py). The client's own
    Content-Length never passes through request_headers: a "Connection: Content-Length"
    would otherwise strip it while the body still followed, and the upstream would read the
    body as a second request that no check ever saw.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if host is not None:
        parts += (b"Host: ", host, CRLF)
    if length is not None:
        parts += (b"Content-Length: %d\r\n" % length,)
    if close:
        parts.append(b"Connection: close\r\n")
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    return b"".join(parts)


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class DateHeader:
    """RFC 9110 Date, rendered at most once a second (every response carries one)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


def render_response(status: int, reason: bytes, headers: Iterable[Header], framing: bytes,
                    date: bytes, close: bool) -> bytes:
    """A response head. *framing* is the Content-Length or Transfer-Encoding line, or b""."""
    parts = [b"HTTP/1.1 %d " % status, reason or reason_phrase(status), CRLF]
    has_date = False
    for name, value in headers:
        if not has_date and name.lower() == b"date":
            has_date = True
        parts += (name, b": ", value, CRLF)
    if not has_date:
        parts += (b"Date: ", date, CRLF)
    parts.append(framing)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(CRLF)
    return b"".join(parts)


def response_framing(status: int, length: bytes | None, no_body: bool) -> tuple[bytes, bool]:
    """The framing line of a relayed answer, and whether its body goes out chunked.

    An answer without a body keeps the upstream's Content-Length (a HEAD's or a 304's
    representation length; never on a 204); a body keeps its length, or is re-chunked when
    the upstream sent it chunked or delimited by its close.
    """
    if no_body:
        if length is not None and status != 204:
            return b"Content-Length: " + length + CRLF, False
        return b"", False
    if length is not None:
        return b"Content-Length: " + length + CRLF, False
    return b"Transfer-Encoding: chunked\r\n", True


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def problem(status: int, cause: str, detail: str, date: bytes, *,
            retry_after: float | None = None, close: bool = False) -> tuple[bytes, bytes]:
    """problem.problem_response as bytes, the same fields and headers: (head, body)."""
    body = problem_body(status, cause, detail)
    headers: list[Header] = [
        (b"Tokenproxy-Error", cause.encode()),
        (b"Cache-Control", b"no-store"),
        (b"Content-Type", b"application/problem+json"),
    ]
    if retry_after is not None:
        headers.append((b"Retry-After", b"%d" % max(1, math.ceil(retry_after))))
    head = render_response(status, b"", headers, b"Content-Length: %d\r\n" % len(body), date,
                           close)
    return head, body
