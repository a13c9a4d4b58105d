"""The ``routes`` section: path prefixes, their upstreams and the provider whose token they get."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenproxy.config.model import Provider, Route
from tokenproxy.config.named_files import ca_file, client_certificate, readable_file
from tokenproxy.config.section import Section
from tokenproxy.config.values import (
    is_header_value,
    parse_header_name,
    parse_http_url,
    parse_positive_duration,
)
from tokenproxy.errors import ConfigError


def read_routes(raw: object, providers: Mapping[str, Provider]) -> tuple[Route, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes: at least one route is needed")
    out: list[Route] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        m = Section(item, f"routes[{i}]", Route)
        if not m.has("prefix"):
            raise ConfigError(f"{m.path('prefix')}: required")
        if not m.has("upstream"):
            raise ConfigError(f"{m.path('upstream')}: required")
        prefix = _prefix(m.value("prefix"), m.path("prefix"))
        match = prefix.rstrip("/")
        if match in seen:
            raise ConfigError(f"{m.path('prefix')}: the same prefix as routes[{seen[match]}]")
        seen[match] = i
        route = Route(
            prefix=prefix,
            match=match,
            upstream=parse_http_url(m.value("upstream"), m.path("upstream")),
            preserve_host=m.boolean("preserve_host"),
            **read_attachment(m, providers),
        )
        if route.tls_client_cert_file is not None and route.upstream.scheme != "https":
            raise ConfigError(f"{m.path('tls_client_cert_file')}: the upstream is not https: "
                              "there is no TLS to present a certificate in")
        out.append(route)
    return tuple(out)


def read_attachment(m: Section, providers: Mapping[str, Provider]) -> dict[str, Any]:
    """The keys of Attachment (model.py), as a route and an intercepted host both have them."""
    provider = m.string("provider")
    if provider is None:
        raise ConfigError(f"{m.path('provider')}: required (a name under providers)")
    if provider not in providers:
        raise ConfigError(f"{m.path('provider')}: no provider named {provider!r}")
    value = m.string("value") or ""
    if "{token}" not in value or not is_header_value(value.replace("{token}", "x")):
        raise ConfigError(f"{m.path('value')}: must contain {{token}} and be printable ASCII")
    return {
        "provider": provider,
        "header": m.parse("header", parse_header_name),
        "value": value,
        "retry_on": m.parse("retry_on", _status_list),
        "client_authorization": m.choice("client_authorization"),
        "timeout": m.parse("timeout", parse_positive_duration),
        "ca_file": m.optional("ca_file", ca_file),
        **_client_certificate(m),
    }


def _client_certificate(m: Section) -> dict[str, Path | None]:
    """mTLS to the upstream: a certificate and its key, together, loaded now."""
    cert = m.optional("tls_client_cert_file", readable_file)
    key = m.optional("tls_client_key_file", readable_file)
    if (cert is None) != (key is None):
        raise ConfigError(f"{m.path('tls_client_cert_file')}: give tls_client_cert_file and "
                          "tls_client_key_file together")
    if cert is not None and key is not None:
        client_certificate(cert, key, m.path("tls_client_cert_file"))
    return {"tls_client_cert_file": cert, "tls_client_key_file": key}


def _prefix(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw.startswith("/") or raw.startswith("//"):
        raise ConfigError(f"{where}: must start with a single /")
    if any(c in raw for c in "?#%\\ ") or any(seg in (".", "..") for seg in raw.split("/")):
        raise ConfigError(f"{where}: use a plain path (no ?, #, %, \\, spaces or dot segments)")
    return raw


def _status_list(raw: object, where: str) -> frozenset[int]:
    items = raw if isinstance(raw, list) else [raw]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 599:
            raise ConfigError(f"{where}: expected HTTP status codes from 400 to 599")
    return frozenset(items)
