"""Header policy for both directions: pure functions over multidicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

# The hop-by-hop set (RFC 9110 section 7.6.1, plus the obsolete ones); Proxy-* by prefix.
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
})
# Never forwarded upstream besides the hop-by-hop set: Host is the upstream's (unless
# preserve_host), Expect is answered by us, HTTP2-Settings belongs to a refused h2c upgrade.
MIN_ECHO_TOKEN: Final = 12
REQUEST_ONLY_LOCAL: Final = frozenset({"host", "expect", "http2-settings"})


def connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Names listed in Connection (RFC 9110 section 7.6.1) are hop-by-hop too."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(
        name.strip().lower() for value in values for name in value.split(",") if name.strip()
    )


def forward_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    drop: frozenset[str],
    auth_header: str,
    keep_client_auth: bool,
    preserve_host: bool,
) -> tuple[CIMultiDict[str], bool, int]:
    """Copy the client's headers for the upstream.

    Returns (headers, client_sent_auth_header, names dropped as invalid). Hop-by-hop and
    Connection-listed names are removed before the token is attached, so
    ``Connection: Authorization`` cannot strip it. With ``replace`` the client's own value of
    the auth header is dropped; with ``keep`` it passes untouched and no token is added.
    Names other than letters, digits and "-" are dropped, as nginx does: CGI, WSGI and FastCGI
    servers map ``Content_Length`` or ``X.Forwarded.For`` to the same variable as the real
    header.
    """
    listed = connection_listed(headers)
    auth_low = auth_header.lower()
    out: CIMultiDict[str] = CIMultiDict()
    client_auth = False
    invalid = 0
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if not (low.isascii() and low.replace("-", "").isalnum()):
            invalid += 1
            continue
        # One spelling per name: aiohttp's client keeps "X-Foo" and "x-foo" apart in a
        # case-sensitive set and lets the second replace the first.
        name = spelling.setdefault(low, name)
        if low == "host":
            # Before the Connection-listed check: "Connection: Host" must not swap the
            # client's Host for the upstream's on a preserve_host route.
            if preserve_host:
                out.add(name, value)
            continue
        if (
            low in HOP_BY_HOP
            or low in drop
            or low.startswith("proxy-")
            or low in listed
        ):
            continue
        if low in REQUEST_ONLY_LOCAL:
            continue
        if low == auth_low:
            if not keep_client_auth:
                continue
            client_auth = True
        out.add(name, value)
    return out, client_auth, invalid


def forward_response_headers(
    headers: CIMultiDictProxy[str],
    *,
    token: str,
    rewrite_location: Callable[[str], str],
) -> CIMultiDict[str]:
    """Copy the upstream's headers for the client: repeated ones (Set-Cookie) survive.

    Hop-by-hop fields go; a header that echoes the token is dropped so the token never
    reaches the client; a Location inside a route's upstream is rewritten to the proxy.
    """
    listed = connection_listed(headers)
    # A token short enough to occur by chance in a Date or ETag is not looked for.
    echoes_token = len(token) >= MIN_ECHO_TOKEN
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in listed or low.startswith("proxy-"):
            continue
        if echoes_token and token in value:
            continue
        if low == "location":
            value = rewrite_location(value)
        out.add(name, value)
    return out

