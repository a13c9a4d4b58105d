"""Pure parsers for config scalars: durations, sizes, listeners, URLs, environment references.

Each takes the raw YAML value and the key path, and raises ConfigError naming that path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from tokenproxy.errors import ConfigError

# Names under which a value is taken for a secret (a JSON login's fields, its headers).
SECRET_NAME: Final = re.compile(r"(?i)pass|secret|token|key|auth|credential")


def digest(value: Any, length: int = 16) -> str:
    """A stable fingerprint of a JSON-able value (never of a secret): what names a provider's
    identity in the state file and in Redis, and parts of an identity."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def without_secrets(node: Any, key: str = "") -> Any:
    """*node* with every value under a secret-sounding key left out."""
    if isinstance(node, dict):
        return {k: without_secrets(v, str(k)) for k, v in node.items()
                if not SECRET_NAME.search(str(k))}
    if isinstance(node, list):
        return [without_secrets(v, key) for v in node]
    return node


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string whose repr and str are masked, so it cannot leak through formatting."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "***"

    def __repr__(self) -> str:
        return "Secret(***)"


_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)


def _is_number(raw: object) -> bool:
    return isinstance(raw, int | float) and not isinstance(raw, bool)


def _as_float(raw: object) -> float:
    try:
        return float(raw)  # type: ignore[arg-type]
    except OverflowError:   # an int too large for a float
        return math.inf


def parse_duration(raw: object, where: str, *, allow_zero: bool = True) -> float:
    """Accept 30, 2.5, "30" (from ${VAR}), "500ms", "30s", "5m", "1h" and return seconds."""
    value: float | None = None
    if _is_number(raw):
        value = _as_float(raw)
    elif isinstance(raw, str):
        m = _DURATION_RE.fullmatch(raw.strip())
        if m:
            value = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        floor = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{where}: not {floor} duration (like 500ms, 30s, 5m, 1h)")
    return value


def parse_positive_duration(raw: object, where: str) -> float:
    """As parse_duration, refusing 0: a timeout or a cache lifetime."""
    return parse_duration(raw, where, allow_zero=False)


def parse_size(raw: object, where: str) -> int:
    """Accept 1024, "64KiB", "1MiB", "2GB" and return bytes."""
    value: float | None = None
    if _is_number(raw):
        value = _as_float(raw)
    elif isinstance(raw, str):
        m = _SIZE_RE.fullmatch(raw.strip())
        if m:
            value = float(m[1]) * _SIZE_UNITS[(m[2] or "").lower()]
    if value is None or not math.isfinite(value) or value < 0 or value != int(value):
        raise ConfigError(f"{where}: not a size (like 65536, 64KiB, 1MiB)")
    return int(value)


_ENV_RE: Final = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: Mapping[str, str], where: str) -> str:
    """Replace ${NAME} and ${NAME:-default}; "$$" stands for a literal "$"."""

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, default = m[1], m[2]
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return default
        return value

    if "$" not in text:
        return text
    return _ENV_RE.sub(sub, text)


def written_text(text: str, env: Mapping[str, str]) -> str:
    """What expand_env(text) keeps of the file's own text: everything but the values taken
    from the environment (the default of a ${NAME:-default} that applies was written there)."""

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        value = env.get(m[1])
        if value is None or (value == "" and m[2] is not None):
            return m[2] or ""
        return ""

    return _ENV_RE.sub(sub, text)


@dataclass(frozen=True, slots=True)
class Listener:
    """One address to listen on: TCP host and port, or a unix socket path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and loopback addresses, which other hosts cannot reach."""
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_listener(raw: object, where: str) -> Listener:
    """Parse "host:port", "[::1]:port" or "unix:/path"."""
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: not a listen address (host:port, [::1]:port or unix:/path)")
    text = raw.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ConfigError(f"{where}: a unix socket needs an absolute path (unix:/run/x.sock)")
        return Listener(kind="unix", path=path)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not m:
        raise ConfigError(f"{where}: not a listen address (host:port, [::1]:port or unix:/path)")
    host = m[1] if m[1] is not None else m[3]
    port = int(m[2] if m[2] is not None else m[4])
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range")
    if m[1] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    if not host:
        raise ConfigError(f"{where}: name the host to bind (127.0.0.1:8080, not :8080)")
    return Listener(kind="tcp", host=host, port=port)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How tokenproxy's client side of a TLS connection is set up: extra CA file, and the
    certificate it presents (mTLS). All None: the system roots, no certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def default(self) -> bool:
        return self.ca_file is None and self.cert_file is None


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """An absolute http(s) URL split into the parts the proxy needs."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def parse_http_url(raw: object, where: str, *, allow_query: bool = False) -> HttpUrl:
    """An absolute http(s) URL with a host, no userinfo and no fragment."""
    bad = f"{where}: not an absolute http(s) URL"
    if not isinstance(raw, str):
        raise ConfigError(bad)
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(bad) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(bad)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: credentials in the URL are not allowed; use a provider")
    if parts.fragment or (parts.query and not allow_query):
        raise ConfigError(f"{where}: a query string or fragment is not allowed here")
    if any(c.isspace() or not c.isprintable() for c in raw):
        raise ConfigError(bad)   # whitespace or control characters: no URL has them
    return HttpUrl(
        url=raw.strip(),
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or (443 if parts.scheme == "https" else 80),
        path=parts.path or "/",
    )


_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header_name(raw: object, where: str) -> str:
    """An RFC 9110 field name."""
    if not isinstance(raw, str) or not _TOKEN_CHARS.fullmatch(raw):
        raise ConfigError(f"{where}: not a valid header name")
    return raw


def is_header_value(text: str) -> bool:
    """Visible ASCII and inner spaces only: nothing that could split or smuggle a header."""
    return all(0x20 <= ord(c) < 0x7F for c in text) and text == text.strip()


def parse_json_pointer(raw: object, where: str) -> str:
    """An RFC 6901 JSON Pointer ("" or starting with "/")."""
    if not isinstance(raw, str) or (raw and not raw.startswith("/")):
        raise ConfigError(f"{where}: not a JSON Pointer (like /access_token)")
    if re.search(r"~(?![01])", raw):
        raise ConfigError(f"{where}: not a JSON Pointer ('~' must be ~0 or ~1)")
    return raw
