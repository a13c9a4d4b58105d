"""Where a forward-proxy request goes, decided on its text alone: the CONNECT authority or the
absolute-form URL, matched against the config's lists. Names are compared as written (lower
case, no trailing dot) and IP literals as addresses, never after resolving anything: a name
that resolves to loopback is not a way in. Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from tokenproxy.config.forward_proxy import HOST_NAME
from tokenproxy.config.model import ForwardProxyConfig, InterceptHost
from tokenproxy.errors import RequestRejected

HTTP_PORT: Final = 80


@dataclass(frozen=True, slots=True)
class Target:
    host: str        # a lower-case name, or an IP address in its canonical text
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Tunnel:
    """CONNECT passed through as opaque bytes: no token, nothing decrypted."""


TUNNEL: Final = Tunnel()
Decision = InterceptHost | Tunnel | None   # None: refused


def _bad(detail: str) -> RequestRejected:
    return RequestRejected(400, "bad_request", detail)


def host_of(text: str) -> str:
    """A host as a target names it: a name, or an IP literal (IPv6 in brackets)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise _bad("the target's IPv6 address is malformed") from None
    name = text.lower().rstrip(".") if text.endswith(".") and text != "." else text.lower()
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(name):
        raise _bad("the target's host is not a host name")
    return name


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise _bad("the target's port is not a port number")
    return int(text)


def connect_target(authority: str) -> Target:
    """``host:port`` of a CONNECT (RFC 9110 section 9.3.6: the port is required)."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host:
        raise _bad("CONNECT needs host:port")
    return Target(host_of(host), _port(port))


def absolute_target(url: str) -> tuple[Target, str]:
    """The target of an absolute-form ``http://host[:port]/path?query`` request, and the
    origin-form path and query to send on."""
    if not url.lower().startswith("http://"):
        raise _bad("a proxy request names an http:// URL (https:// goes through CONNECT)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("the request's URL is malformed") from None
    if parts.username is not None or parts.password is not None or not parts.netloc:
        raise _bad("the request's URL has no host, or carries credentials")
    if port == 0:
        raise _bad("the target's port is not a port number")
    netloc = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    path = parts.path or "/"
    return (Target(host_of(netloc), HTTP_PORT if port is None else port),
            path + (f"?{parts.query}" if parts.query or url.endswith("?") else ""))


def matches(pattern: str, host: str) -> bool:
    """An exact name or address, or ``*.name``: exactly one label before *name*."""
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:] and not _is_ip(host)
    return pattern == host


def decide(cfg: ForwardProxyConfig, target: Target, *, connect: bool) -> Decision:
    """The intercept entry for *target*, TUNNEL for a listed tunnel (CONNECT only), or None."""
    for entry in cfg.intercept:
        if entry.port == target.port and matches(entry.host, target.host):
            return entry
    if connect:
        for pattern, port in cfg.tunnel:
            if port == target.port and matches(pattern, target.host):
                return TUNNEL
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def local_address(address: str) -> bool:
    """Loopback, unspecified or link-local (where cloud metadata services answer): addresses
    a tunnel reaches only when its host names one itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # ::ffff:127.0.0.1 connects to 127.0.0.1
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local


def names_local(host: str) -> bool:
    """Whether a tunnel's host is itself local: ``localhost`` or a local address literal."""
    return host in ("localhost", "localhost.") or local_address(host)
