"""Who may use the proxy: Host allowlist, cross-site and relayed requests, keys, head size.

On (name, value) byte pairs, for both request paths and the admin listener.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Final

from tokenproxy.config import LimitsConfig, SecurityConfig
from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.rules.headers import Header

FORWARDING_HEADERS: Final = {b"forwarded": "Forwarded", b"x-forwarded-for": "X-Forwarded-For",
                             b"via": "Via"}
CLIENT_KEY_HEADER: Final = "Tokenproxy-Key"
_CLIENT_KEY: Final = CLIENT_KEY_HEADER.lower().encode()


def host_name(value: str) -> str:
    """The host part of a Host header, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        # Only ":port" may follow the brackets: "[::1].evil.example" is not ::1.
        if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return value[1:end]
        return value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    return value


def values(headers: Sequence[Header], low_name: bytes) -> list[bytes]:
    """Every value of one field, by its lower-cased name."""
    return [value for name, value in headers if name.lower() == low_name]


def check_host(headers: Sequence[Header], allowed: frozenset[str] | None) -> None:
    """The Host rule of every listener: exactly one Host header naming an allowed host (with
    two, which one counts would be ambiguous; RFC 9112 makes that a bad request); None allows
    any."""
    if allowed is None:
        return
    hosts = values(headers, b"host")
    if len(hosts) != 1 or host_name(hosts[0].decode("utf-8", "surrogateescape")) not in allowed:
        raise RequestRejected(403, "forbidden_host", "the Host header names no allowed host")


class SecurityPolicy:
    """The ``security`` settings: ``check`` raises RequestRejected with the status of the
    first rule a request breaks (head size, Host, relayed, cross-site, key, required header)."""

    def __init__(self, cfg: SecurityConfig, limits: LimitsConfig) -> None:
        self._hosts = cfg.allowed_hosts
        self._cross_site = cfg.reject_cross_site
        self._forwarded = cfg.reject_forwarded
        # (the name lower-cased, its value, the name as configured for the message)
        self._required = None if cfg.require_header is None else (
            cfg.require_header[0].lower().encode(), cfg.require_header[1].encode(),
            cfg.require_header[0])
        self._key = cfg.client_key.value.encode() if cfg.client_key else None
        self._max_head = limits.max_header_size

    @property
    def local_headers(self) -> frozenset[bytes]:
        """Field names meant for the proxy alone (lower-cased), never forwarded."""
        names = {_CLIENT_KEY}
        if self._required is not None:
            names.add(self._required[0])
        return frozenset(names)

    def check(self, headers: Sequence[Header], head_line_size: int) -> None:
        size = head_line_size
        for name, value in headers:
            size += len(name) + len(value) + 4
        if size > self._max_head:
            raise RequestRejected(431, "header_too_large",
                                  f"the request head exceeds {self._max_head} bytes")
        check_host(headers, self._hosts)
        lows = [name.lower() for name, _ in headers]
        if self._forwarded:
            for low in lows:
                if low in FORWARDING_HEADERS:
                    raise RequestRejected(403, "forwarded", "requests relayed with "
                                          f"{FORWARDING_HEADERS[low]} are refused")
        if self._cross_site:
            if b"origin" in lows:
                raise RequestRejected(403, "cross_site",
                                      "browser requests carrying Origin are refused")
            # Every value: a repeated header must not hide a cross-site one behind "none".
            if any(v.strip().lower() != b"none" for v in values(headers, b"sec-fetch-site")):
                raise RequestRejected(403, "cross_site",
                                      "browser requests from a site are refused")
        if self._key is not None:
            keys = values(headers, _CLIENT_KEY)
            if len(keys) != 1 or not hmac.compare_digest(keys[0], self._key):
                raise RequestRejected(403, "client_key",
                                      f"a valid {CLIENT_KEY_HEADER} header is required")
        if self._required is not None:
            name, value, shown = self._required
            got = values(headers, name)
            if len(got) != 1 or got[0].strip() != value:
                raise RequestRejected(412, "require_header", f"the header {shown} is required")
