"""Which requests the fast path takes: a pure classification of one request head.

The fast path answers a plain HTTP/1.1 request itself -- no body or a Content-Length body; no
Upgrade, Expect or Transfer-Encoding; at most MAX_FAST_HEADERS fields and no repeated singleton
field; one that passes every security check and matches a route. Anything else is handed to
aiohttp's protocol, and ``classify`` says why (the reason labels
``tokenproxy_fast_path_handovers_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httptools

from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.rules.target import REFUSED_METHODS, CompiledRoute, split_target

if TYPE_CHECKING:
    from tokenproxy.proxy.runtime import Proxy

# More header lines than this go to aiohttp, whose limit (128) answers 431.
MAX_FAST_HEADERS: Final = 100
_NOT_FAST: Final = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
# Headers aiohttp's parser refuses to see twice (its SINGLETON_HEADERS).
_SINGLETONS: Final = frozenset({
    b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
    b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent",
})


@dataclass(slots=True)
class Request:
    """A request the fast path takes."""

    method: bytes
    method_str: str
    target: str
    path: str
    query: str | None
    headers: list[Header]
    length: int | None       # Content-Length; None or 0: no body
    keep_alive: bool
    compiled: CompiledRoute
    proxy: Proxy


class _HeadParse:
    """llhttp callbacks for one request head."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[Header] = []
        self.complete = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete += 1


def classify(head: bytes, proxy: Proxy) -> Request | str:
    """The request in *head* (up to and including its blank line) if the fast path takes it,
    else why not: "malformed" (aiohttp answers 400 or 431), "protocol" (HTTP/1.0, chunked,
    Expect, Upgrade, CONNECT: aiohttp serves it), "refused" (a check or no route: aiohttp
    answers the 4xx)."""
    cb = _HeadParse()
    parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        return "protocol"   # CONNECT and Upgrade
    except httptools.HttpParserError:
        return "malformed"
    if cb.complete != 1:
        return "malformed"
    if parser.get_http_version() != "1.1":
        return "protocol"
    headers = cb.headers
    if len(headers) > MAX_FAST_HEADERS:
        return "malformed"
    length: int | None = None
    keep_alive = True
    singletons: set[bytes] = set()
    for name, value in headers:
        low = name.lower()
        if low in _NOT_FAST:
            return "protocol"
        if low in _SINGLETONS:
            if low in singletons:
                return "malformed"   # aiohttp refuses a repeated one with 400
            singletons.add(low)
        if low == b"content-length":
            length = int(value)   # llhttp allows one, all digits
        elif low == b"connection" and b"close" in (
                p.strip().lower() for p in value.split(b",")):
            keep_alive = False
    method = parser.get_method()
    method_str = method.decode("ascii")
    if method_str in REFUSED_METHODS:
        return "refused"
    target = cb.url.decode("utf-8", "surrogateescape")
    try:
        path, query = split_target(method_str, target)
        proxy.policy.check(headers, len(method) + len(cb.url) + 12)
    except RequestRejected:
        return "refused"
    compiled = proxy.table.match(path)
    if compiled is None:
        return "refused"
    return Request(method, method_str, target, path, query, headers, length, keep_alive,
                   compiled, proxy)
