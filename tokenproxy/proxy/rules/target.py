"""Request-target checks, route matching and upstream URL building: pure functions.

The upstream URL is the route's fixed origin plus raw path bytes; nothing the client sends can
change the origin, so the token only ever goes where the route points.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from yarl import URL

from tokenproxy.config import Route
from tokenproxy.errors import RequestRejected

REFUSED_METHODS: Final = frozenset({"CONNECT", "TRACE", "TRACK"})
# Overlong UTF-8 (a character spelled with more bytes than it needs): lenient decoders upstream
# turn "%c0%ae" into "." and "%c1%9c" into "\\". No valid path needs one: all are refused.
_OVERLONG: Final = re.compile(
    rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]|\xf0[\x80-\x8f][\x80-\xbf]{2}")
# Decoding layers looked through; a path still encoded after that many is refused.
_DECODE_ROUNDS: Final = 8
_PERCENT_U: Final = re.compile(rb"%[uU]([0-9a-fA-F]{4})")   # IIS-style %u002e


def _bad(detail: str) -> RequestRejected:
    return RequestRejected(400, "bad_request", detail)


def split_target(method: str, raw_target: str) -> tuple[str, str | None]:
    """Check the request target and split it into raw path and raw query (None if no '?')."""
    if method in REFUSED_METHODS:
        raise _bad(f"the {method} method is not proxied")
    if not raw_target.startswith("/"):
        raise _bad("only origin-form request targets (/path?query) are proxied")
    if raw_target.startswith("//"):
        raise _bad("a request path may not start with //")
    if "#" in raw_target:
        raise _bad("a request target may not carry a fragment")
    path, sep, query = raw_target.partition("?")
    check_path(path)
    return path, (query if sep else None)


def check_path(path: str) -> None:
    """Refuse dot segments in any encoding, and encoded NUL: they could escape a route prefix.

    Every decoding layer an upstream might apply is applied here -- percent-decoding as often
    as it changes anything (up to eight layers; a path encoded deeper is refused), IIS-style
    ``%u002e``, overlong UTF-8, Unicode compatibility forms (NFKC: a full-width dot is a dot),
    backslash as slash, ';' parameters -- and any "." or ".." segment in any of them is
    refused, whether or not it would climb above the prefix.
    """
    if path.isascii() and "%" not in path and "." not in path and "\\" not in path:
        return  # the common case costs four scans
    raw = path.encode("utf-8", "surrogateescape")
    for _ in range(_DECODE_ROUNDS):
        _check_layer(raw)
        decoded = unquote_to_bytes(_PERCENT_U.sub(_percent_u, raw))
        if decoded == raw:
            return
        raw = decoded
    raise _bad("the request path is percent-encoded too many times")


def _percent_u(m: re.Match[bytes]) -> bytes:
    return chr(int(m[1], 16)).encode("utf-8", "surrogatepass")


def _check_layer(raw: bytes) -> None:
    """One decoding layer of the path: no NUL, no overlong UTF-8, no "." or ".." segment in
    any spelling."""
    if _OVERLONG.search(raw):
        raise _bad("the request path contains overlong UTF-8")
    text = raw.decode("utf-8", "surrogateescape")
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    text = text.replace("\\", "/")
    if "\x00" in text:
        raise _bad("the request path contains an encoded NUL")
    for segment in text.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            raise _bad("the request path contains a dot segment")


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route with everything per-request work needs, computed once at start or reload."""

    route: Route
    match: str              # "" for the root route
    match_slash: str        # match + "/"
    origin: str             # scheme://host[:port]
    base_path: str          # upstream path without a trailing slash
    origin_url: URL
    header_prefix: str      # the header value before and after {token}
    header_suffix: str
    auth_header_low: bytes  # the token header's name, lower-cased, as bytes
    host_header: bytes      # the Host the upstream expects (port only when not the default)

    @classmethod
    def build(cls, route: Route) -> CompiledRoute:
        before, _, after = route.value.partition("{token}")
        origin = URL(route.upstream.origin)
        host = origin.raw_host or ""
        if ":" in host:
            host = f"[{host}]"
        if not origin.is_default_port():
            host = f"{host}:{origin.port}"
        return cls(
            route=route,
            match=route.match,
            match_slash=route.match + "/",
            origin=route.upstream.origin,
            base_path=route.upstream.path.rstrip("/"),
            origin_url=URL(route.upstream.origin),
            header_prefix=before,
            header_suffix=after,
            auth_header_low=route.header.lower().encode("latin-1"),
            host_header=host.encode("idna") if not host.isascii() else host.encode(),
        )

    def header_value(self, token: str) -> str:
        return self.header_prefix + token + self.header_suffix

    def upstream_target(self, path: str, query: str | None) -> str:
        """The upstream request target: upstream path + the rest of the raw path + raw query.

        The connection goes to the route's origin whatever this says; the target always
        starts with "/" (split_target refused anything else), and an empty query keeps its "?".
        """
        rest = path[len(self.match):]
        up_path = self.route.upstream.path if not rest else self.base_path + rest
        return up_path if query is None else up_path + "?" + query

    def upstream_url(self, path: str, query: str | None) -> URL:
        """Origin + upstream path + the remainder of the raw path, + the raw query, unchanged."""
        rest = path[len(self.match):]
        up_path = self.route.upstream.path if not rest else self.base_path + rest
        text = self.origin + up_path + ("" if query is None else "?" + query)
        url = URL(text, encoded=True)
        if url.origin() != self.origin_url:   # last check before a token goes on the request
            raise _bad("the request would leave the route's upstream")
        return url

    def proxy_location(self, up_path_and_query: str) -> str | None:
        """The proxy path for an upstream path inside this route's upstream path, else None."""
        path, sep, query = up_path_and_query.partition("?")
        base = self.base_path
        if path == self.route.upstream.path or path == base:
            rest = ""
        elif path.startswith(base + "/"):
            rest = path[len(base):]
        else:
            return None
        proxy_path = (self.match + rest) if rest else self.route.prefix
        return proxy_path + (sep + query if sep else "")

    def location_target(self, location: str) -> tuple[str, str] | None:
        """(origin, path and query) a Location from this route's upstream points at, or None
        when it names no http(s) place of its own (scheme-relative, another scheme, junk)."""
        if location.startswith("//"):
            return None  # scheme-relative: another host as far as we can tell
        if location.startswith("/"):
            return self.origin, location
        try:
            url = URL(location, encoded=True)
        except ValueError:
            return None
        if not url.absolute or url.scheme not in ("http", "https"):
            return None
        origin = str(url.origin())
        rest = location[len(origin):]
        # The normalised origin drops a default port: "http://h:80/x" starts with "http://h"
        # but its rest is the path, not ":80/x".
        if not location.startswith(origin) or rest[:1] not in ("", "/", "?", "#"):
            rest = url.raw_path_qs
        if not rest.startswith("/"):
            rest = "/" + rest
        return origin, rest


class RouteTable:
    """Longest-prefix matching on path segments: /api matches /api and /api/x, not /apix."""

    def __init__(self, routes: Sequence[Route]) -> None:
        compiled = [CompiledRoute.build(r) for r in routes]
        self.routes: tuple[CompiledRoute, ...] = tuple(
            sorted(compiled, key=lambda c: len(c.match), reverse=True)
        )

    def match(self, path: str) -> CompiledRoute | None:
        for c in self.routes:
            if not c.match or path == c.match or path.startswith(c.match_slash):
                return c
        return None

    def rewrite_location(self, location: str, current: CompiledRoute) -> str:
        """A Location from *current*'s upstream, for the client.

        Into that route's own upstream path, and back to that route through the proxy: the
        proxy path. Anywhere else on the same upstream: an absolute URL at the upstream
        itself, never a proxy path -- read as one, another route would serve it with its
        token, so upstream A could send a redirect-following client to upstream B. Another
        origin passes unchanged (the token never goes there).
        """
        target = current.location_target(location)
        if target is None or target[0] != current.origin:
            return location
        origin, rest = target
        proxied = current.proxy_location(rest)
        if proxied is not None and self.match(proxied.partition("?")[0]) is current:
            return proxied
        return location if location.startswith(origin) else origin + rest
