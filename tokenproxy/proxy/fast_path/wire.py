"""The heads and framing the fast path writes, as bytes: pure functions.

Which fields go into them is decided by proxy/rules (headers, problem); this module only lays
them out on the wire (RFC 9112).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.rules.problem import Problem

CRLF: Final = b"\r\n"
CHUNKED_END: Final = b"0\r\n\r\n"


def render_request(method: bytes, target: bytes, host: bytes | None,
                   headers: Iterable[Header], length: int | None, *, close: bool = False
                   ) -> bytes:
    """The upstream request head up to, not including, the token line and the final CRLF.

    *length* is the body's Content-Length (None: the client sent none); *close* asks the
    upstream to close after answering (rules/reuse.py). The client's own
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


def problem(problem: Problem, date: bytes, *, close: bool = False) -> tuple[bytes, bytes]:
    """An answer of ours (rules/problem.py) as (head, body)."""
    body = problem.body()
    head = render_response(problem.status, b"", problem.headers(),
                           b"Content-Length: %d\r\n" % len(body), date, close)
    return head, body
