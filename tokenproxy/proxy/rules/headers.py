"""Which header fields travel, both ways: pure functions on (name, value) byte pairs.

Both request paths use them: the fast path on the pairs llhttp hands it, the aiohttp path on
aiohttp's ``raw_headers``. Header bytes are latin-1 both ways (RFC 9110 section 5.5), so nothing
is re-encoded on the way through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

Header = tuple[bytes, bytes]

# The hop-by-hop set (RFC 9110 section 7.6.1, and the obsolete ones); Proxy-* by prefix.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Never forwarded upstream besides the hop-by-hop set: Host is the upstream's (unless
# preserve_host), Expect is answered by us, HTTP2-Settings belongs to a refused h2c upgrade.
REQUEST_ONLY_LOCAL: Final = frozenset({b"host", b"expect", b"http2-settings"})
# Upstream header lines up to 64 KiB: large cookies are legitimate, gigantic blocks are not.
MAX_UPSTREAM_FIELD: Final = 64 * 1024
# A token shorter than this could occur by chance in a Date or an ETag: not looked for.
MIN_ECHO_TOKEN: Final = 12
# Answers that never have a body, whatever their framing fields say (RFC 9110 sections
# 15.3.5 and 15.4.5); nor has any answer to HEAD.
NO_BODY_STATUSES: Final = frozenset({204, 304})


def connection_listed(headers: Iterable[Header]) -> frozenset[bytes]:
    """Names listed in Connection (RFC 9110 section 7.6.1), lower-cased: hop-by-hop too."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(p.strip().lower() for p in value.split(b",") if p.strip())
    return frozenset(listed)


def valid_name(low: bytes) -> bool:
    """Letters, digits and "-" only, as nginx accepts by default: CGI, WSGI and FastCGI
    servers read ``Content_Length`` or ``X.Forwarded.For`` as the real header."""
    return low.replace(b"-", b"").isalnum()   # bytes.isalnum: ASCII letters and digits


def request_headers(
    headers: Sequence[Header],
    *,
    drop: frozenset[bytes],
    auth_header: bytes,
    keep_client_auth: bool,
    preserve_host: bool,
) -> tuple[list[Header], bool, int]:
    """The client's fields for the upstream: (fields, client_sent_auth, names dropped as
    invalid).

    Hop-by-hop and Connection-listed names go before the token is attached, so
    ``Connection: Authorization`` cannot strip it. With ``replace`` the client's own value of
    the auth header (*auth_header*, lower-cased) is dropped; with ``keep`` it passes untouched
    and no token is added. Content-Length never passes: each path writes the length it sends
    (a "Connection: Content-Length" would otherwise strip it while the body still followed).
    """
    listed = connection_listed(headers)
    out: list[Header] = []
    client_auth = False
    invalid = 0
    for name, value in headers:
        low = name.lower()
        if not valid_name(low):
            invalid += 1
            continue
        if low == b"host":
            # Before the Connection-listed check: "Connection: Host" must not leave an
            # HTTP/1.1 request without a Host.
            if preserve_host:
                out.append((name, value))
            continue
        if (low == b"content-length" or low in HOP_BY_HOP or low in drop
                or low.startswith(b"proxy-") or low in listed or low in REQUEST_ONLY_LOCAL):
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
    """The upstream's fields for the client; repeated ones (Set-Cookie) survive.

    Hop-by-hop fields go, and framing (Content-Length) is the caller's; a field that echoes
    the token (in its value or its name) is dropped so the token never reaches the client;
    a Location is rewritten by *rewrite_location* (into the proxy, where it points back into
    the route). A rewritten Location goes out as UTF-8; bytes that are not survive the round
    trip unchanged.
    """
    headers = list(headers)
    listed = connection_listed(headers)
    echoes_token = len(token) >= MIN_ECHO_TOKEN
    token_low = token.lower()   # names are compared lower-cased
    out: list[Header] = []
    for name, value in headers:
        low = name.lower()
        if (low in HOP_BY_HOP or low in listed or low.startswith(b"proxy-")
                or low == b"content-length"):
            continue
        if echoes_token and (token in value or token_low in low):
            continue
        if low == b"location":
            value = rewrite_location(value.decode("utf-8", "surrogateescape")).encode(
                "utf-8", "surrogateescape")
        out.append((name, value))
    return out


def safe_reason(reason: bytes, token: bytes) -> bytes:
    """The upstream's reason phrase, unless it echoes the token (then the standard one)."""
    if len(token) >= MIN_ECHO_TOKEN and token in reason:
        return b""
    return reason
