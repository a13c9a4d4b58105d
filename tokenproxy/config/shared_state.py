"""The ``shared_state`` section: replicas sharing their tokens through Redis."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import urlsplit

from tokenproxy.config.model import SharedStateConfig
from tokenproxy.config.named_files import ca_file, read_secret_file
from tokenproxy.config.section import Section
from tokenproxy.config.values import Secret, parse_positive_duration
from tokenproxy.errors import ConfigError

REDIS_SCHEMES = ("redis", "rediss", "unix")
KEY_BYTES = 32   # AES-256


def read_shared_state(raw: object) -> SharedStateConfig | None:
    if raw is None:
        return None
    m = Section(raw, "shared_state", SharedStateConfig)
    url = m.secret("redis_url")
    if url is None:
        raise ConfigError("shared_state.redis_url: set it (or redis_url_file)")
    _check_url(url, m.path("redis_url"))
    prefix = m.string("key_prefix") or ""
    if not prefix.isprintable() or " " in prefix:
        raise ConfigError("shared_state.key_prefix: printable characters without spaces")
    key_file = m.optional("encryption_key_file", _path)
    cfg = SharedStateConfig(
        redis_url=url,
        key_prefix=prefix,
        encryption_key_file=key_file,
        lock_ttl=m.parse("lock_ttl", parse_positive_duration),
        timeout=m.parse("timeout", parse_positive_duration),
        ca_file=m.optional("ca_file", ca_file),
        encryption_keys=() if key_file is None else read_keys(
            key_file, m.path("encryption_key_file")),
    )
    if cfg.ca_file is not None and not url.value.lower().startswith("rediss://"):
        raise ConfigError("shared_state.ca_file: applies to rediss:// (TLS) URLs only")
    if cfg.lock_ttl < 2 * cfg.timeout:
        # The lease is renewed every third of lock_ttl by a call that may take `timeout`.
        raise ConfigError("shared_state.lock_ttl: must be at least twice shared_state.timeout")
    return cfg


def read_keys(path: Path, where: str) -> tuple[bytes, ...]:
    """One base64 key of 32 bytes per line (``openssl rand -base64 32``); blank lines and
    ``#`` comments are skipped. The first line encrypts; every line decrypts (rotation)."""
    keys: list[bytes] = []
    for number, line in enumerate(read_secret_file(path, where).splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: line {number} of {path} is not base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{where}: line {number} of {path} holds {len(key)} bytes, not "
                              f"{KEY_BYTES} (make one with: openssl rand -base64 32)")
        keys.append(key)
    if not keys:
        raise ConfigError(f"{where}: {path} holds no key")
    return tuple(keys)


def redacted_url(url: str) -> str:
    """The URL without its user and password, for check-config and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = host + port
    return f"{parts.scheme}://{netloc}{parts.path}"


def _check_url(url: Secret, where: str) -> None:
    try:
        parts = urlsplit(url.value)
        parts.port   # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{where}: expected a redis://, rediss:// or unix:// URL")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{where}: the URL names no host")
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/\d{1,4}", parts.path):
        raise ConfigError(f"{where}: the path names the database by its number (/0 to /9999)")
    if parts.query or parts.fragment:
        # Options belong in this section's keys, where they are checked.
        raise ConfigError(f"{where}: query options are not accepted; use this section's keys")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url.value):
        raise ConfigError(f"{where}: control characters or spaces in the URL")


def _path(raw: object, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a file path")
    return Path(raw)
