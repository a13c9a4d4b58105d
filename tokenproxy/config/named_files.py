"""The files a config names (secrets, static tokens, CA bundles): read or tried at load time, so
a missing or bad one is a config error naming its key, not a failure later."""

from __future__ import annotations

import ssl
from pathlib import Path

from tokenproxy.errors import ConfigError


def read_secret_file(path: Path, where: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read {path}: {reason}") from None
    secret = text.rstrip("\r\n")
    if not secret.strip():
        # An empty secret is a mistake (a volume not mounted yet), never a credential.
        raise ConfigError(f"{where}: {path} is empty")
    return secret


def readable_file(raw: object, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a file path")
    path = Path(raw)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    return path


def ca_file(raw: object, where: str) -> Path:
    """A readable PEM CA bundle: loaded now, so a bad one is a config error, not a crash."""
    path = readable_file(raw, where)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigError(f"{where}: {path} holds no usable PEM certificate") from None
    return path
