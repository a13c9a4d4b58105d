"""Who may use the proxy: Host allowlist, cross-site and relayed requests, keys, head size."""

from __future__ import annotations

import hmac
from typing import Final

from multidict import CIMultiDictProxy

from tokenproxy.config import LimitsConfig, SecurityConfig
from tokenproxy.errors import RequestRejected

FORWARDING_HEADERS: Final = ("Forwarded", "X-Forwarded-For", "Via")
CLIENT_KEY_HEADER: Final = "Tokenproxy-Key"


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


def check_host(headers: CIMultiDictProxy[str], allowed: frozenset[str] | None) -> None:
    """The Host rule of every listener: exactly one Host header naming an allowed host (with
    two, which one counts would be ambiguous; RFC 9112 makes that a bad request); None allows
    any."""
    if allowed is None:
        return
    hosts = headers.getall("Host", ())
    if len(hosts) != 1 or host_name(hosts[0]) not in allowed:
        raise RequestRejected(403, "forbidden_host", "the Host header names no allowed host")


class SecurityPolicy:
    """The ``security`` settings: each check raises RequestRejected with its status."""

    def __init__(self, cfg: SecurityConfig, limits: LimitsConfig) -> None:
        self._hosts = cfg.allowed_hosts
        self._cross_site = cfg.reject_cross_site
        self._forwarded = cfg.reject_forwarded
        self._require = cfg.require_header
        self._key = cfg.client_key.value.encode() if cfg.client_key else None
        self._max_head = limits.max_header_size

    @property
    def local_headers(self) -> frozenset[str]:
        """Headers meant for the proxy alone, never forwarded."""
        names = {CLIENT_KEY_HEADER.lower()}
        if self._require is not None:
            names.add(self._require[0].lower())
        return frozenset(names)

    def check(
        self,
        headers: CIMultiDictProxy[str],
        raw_headers: tuple[tuple[bytes, bytes], ...],
        head_line_size: int,
    ) -> None:
        size = head_line_size
        for raw_name, raw_value in raw_headers:
            size += len(raw_name) + len(raw_value) + 4
        if size > self._max_head:
            raise RequestRejected(431, "header_too_large",
                                  f"the request head exceeds {self._max_head} bytes")
        check_host(headers, self._hosts)
        if self._forwarded:
            for name in FORWARDING_HEADERS:
                if name in headers:
                    raise RequestRejected(403, "forwarded",
                                          f"requests relayed with {name} are refused")
        if self._cross_site:
            if "Origin" in headers:
                raise RequestRejected(403, "cross_site",
                                      "browser requests carrying Origin are refused")
            # Every value: a repeated header must not hide a cross-site one behind "none".
            sites = headers.getall("Sec-Fetch-Site", ())
            if any(site.strip().lower() != "none" for site in sites):
                raise RequestRejected(403, "cross_site",
                                      "browser requests from a site are refused")
        if self._key is not None:
            keys = headers.getall(CLIENT_KEY_HEADER, ())
            if len(keys) != 1 or not hmac.compare_digest(
                keys[0].encode("utf-8", "surrogateescape"), self._key
            ):
                raise RequestRejected(403, "client_key",
                                      f"a valid {CLIENT_KEY_HEADER} header is required")
        if self._require is not None:
            name, value = self._require
            got = headers.getall(name, ())
            if len(got) != 1 or got[0].strip() != value:
                raise RequestRejected(412, "require_header", f"the header {name} is required")
