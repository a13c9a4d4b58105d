"""The ``forward_proxy`` section: a second listener for tools that honour HTTPS_PROXY."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from tokenproxy.config.model import (
    ForwardCA,
    ForwardProxyConfig,
    InterceptHost,
    Provider,
)
from tokenproxy.config.routes import read_attachment
from tokenproxy.config.section import Section
from tokenproxy.config.values import parse_listener
from tokenproxy.errors import ConfigError

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
# A host name as the forward proxy takes it, in the config and in a request (forward/targets).
HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
DEFAULT_PORT = 443
HTTP_PORT = 80
CA_FILE = "forward-ca.pem"
CA_KEY_FILE = "forward-ca-key.pem"


def read_forward_proxy(raw: object, providers: Mapping[str, Provider],
                       state_dir: Path | None) -> ForwardProxyConfig | None:
    if raw is None:
        return None
    m = Section(raw, "forward_proxy", ForwardProxyConfig)
    listen = (parse_listener(m.value("listen"), m.path("listen")) if m.has("listen")
              else m.default("listen"))
    intercept = _intercepts(m.value("intercept"), providers)
    tunnel = _tunnels(m.value("tunnel"))
    listed = {(e.host, e.port) for e in intercept}
    both = [f"{host}:{port}" for host, port in tunnel if (host, port) in listed]
    if both:
        raise ConfigError(f"forward_proxy.tunnel: {both[0]} is intercepted too; list it once")
    if not intercept and not tunnel:
        raise ConfigError("forward_proxy.intercept: list the hosts to attach tokens for")
    return ForwardProxyConfig(listen=listen, ca=_ca(m.value("ca"), state_dir),
                              intercept=intercept, tunnel=tunnel)


def host_pattern(raw: object, where: str) -> str:
    """A host name (lower-cased), ``*.name`` for any one label before *name*, or an IP
    literal. A wildcard needs two labels after it: ``*.com`` would take a whole TLD."""
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: expected a host name")
    text = raw.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text[2:] if text.startswith("*.") else text
    if not HOST_NAME.fullmatch(name) or (name != text and name.count(".") < 1):
        raise ConfigError(f"{where}: expected a host name, *.name (one label) or an IP "
                          "address")
    return text


def _intercepts(raw: object, providers: Mapping[str, Provider]) -> tuple[InterceptHost, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("forward_proxy.intercept: expected a list")
    out: list[InterceptHost] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(raw):
        m = Section(item, f"forward_proxy.intercept[{i}]", InterceptHost)
        host = host_pattern(m.value("host"), m.path("host"))
        port = m.parse("port", _port)
        if (host, port) in seen:
            raise ConfigError(f"{m.path('host')}: {host}:{port} is listed twice")
        seen.add((host, port))
        scheme: Literal["https", "http"] = (
            m.choice("scheme") if m.has("scheme") else "http" if port == HTTP_PORT else "https")
        for key in ("ca_file", "tls_client_cert_file"):
            if scheme == "http" and m.has(key):
                raise ConfigError(f"{m.path(key)}: a scheme: http entry has no TLS upstream")
        out.append(InterceptHost(host=host, port=port, scheme=scheme,
                                 **read_attachment(m, providers)))
    return tuple(out)


def _tunnels(raw: object) -> tuple[tuple[str, int], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("forward_proxy.tunnel: expected a list of host or host:port")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(raw):
        where = f"forward_proxy.tunnel[{i}]"
        text = item.strip() if isinstance(item, str) else item
        port = DEFAULT_PORT
        # host:port, [v6]:port; a bare IPv6 address has colons but no port.
        found = isinstance(text, str) and (re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", text)
                                           or re.fullmatch(r"([^:\[\]]+):(\d{1,5})", text))
        if found:
            text, port = found[1], _port(int(found[2]), where)
        out.append((host_pattern(text, where), port))
    return tuple(out)


def _port(raw: object, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise ConfigError(f"{where}: expected a port from 1 to 65535")
    return raw


def _ca(raw: object, state_dir: Path | None) -> ForwardCA:
    m = Section(raw, "forward_proxy.ca", ForwardCA)
    cert, key = m.string("cert_file"), m.string("key_file")
    if (cert is None) != (key is None):
        raise ConfigError("forward_proxy.ca: give cert_file and key_file together")
    if cert is not None and key is not None:
        return ForwardCA(cert_file=Path(cert), key_file=Path(key))
    if state_dir is None:
        raise ConfigError("forward_proxy.ca.cert_file: set cert_file and key_file (there is "
                          "no state directory to generate the CA into)")
    return ForwardCA(cert_file=state_dir / CA_FILE, key_file=state_dir / CA_KEY_FILE,
                     generated=True)
