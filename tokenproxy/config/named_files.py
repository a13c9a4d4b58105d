"""The files a config names (secrets, static tokens, CA bundles, keys, certificates): read or
tried at load time, so a missing or bad one is a config error naming its key, not a failure
later."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import ssl
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from tokenproxy.errors import ConfigError

# No file a config names (a secret, a key, a certificate bundle) is anywhere near this.
MAX_NAMED_FILE: Final = 1024 * 1024
# What a credential looks like when it was given where its file's path belongs.
_CREDENTIAL_SHAPE: Final = re.compile(r"-----BEGIN|^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.")


def _named(path: Path) -> str:
    """*path* for a message about a file that is not there, when it looks like a path: a
    secret given where its file belongs (``client_secret_file: ghp_...``) is not repeated."""
    text = str(path)
    if (text.startswith("/") and not _CREDENTIAL_SHAPE.search(text)
            and all(0x20 < ord(c) < 0x7F for c in text)):
        return text
    return "the file named there"


def read_named_file(path: Path, where: str) -> bytes:
    """The bytes of the regular file at *path* (symlinks followed), bounded. Opened without
    blocking, so a FIFO put in its place cannot hang the process."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {_named(path)}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{where}: cannot read {path}: {os.strerror(errno.EISDIR)}")
        if not stat.S_ISREG(mode):   # a FIFO, a device: nothing a config means by a file
            raise ConfigError(f"{where}: {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_NAMED_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_NAMED_FILE:
        raise ConfigError(f"{where}: {path} is larger than {MAX_NAMED_FILE // 1024} KiB")
    return data


def files_digest(paths: Iterable[Path | None]) -> str:
    """A digest of the files' contents (read as at load; an unreadable one counts as empty:
    loading has reported it already)."""
    h = hashlib.sha256()
    for path in paths:
        if path is not None:
            h.update(str(path).encode() + b"\0")
            with contextlib.suppress(ConfigError):
                h.update(read_named_file(path, "file"))
            h.update(b"\0")
    return h.hexdigest()[:32]


def read_secret_file(path: Path, where: str) -> str:
    try:
        text = read_named_file(path, where).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: cannot read {path}: not UTF-8 text") from None
    secret = text.rstrip("\r\n")
    if not secret.strip():
        # An empty secret is a mistake (a volume not mounted yet), never a credential.
        raise ConfigError(f"{where}: {path} is empty")
    return secret


def readable_file(raw: object, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a file path")
    if any(ord(c) < 0x20 for c in raw) or _CREDENTIAL_SHAPE.search(raw):
        # Never quoted: a key or token given where its path belongs would be in the message.
        raise ConfigError(f"{where}: expected a file path (this looks like the credential "
                          "itself: put it in a file and name the file)")
    path = Path(raw)
    read_named_file(path, where)
    return path


def ca_file(raw: object, where: str) -> Path:
    """A readable PEM CA bundle: loaded now, so a bad one is a config error, not a crash."""
    path = readable_file(raw, where)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigError(f"{where}: {path} holds no usable PEM certificate") from None
    return path


def no_passphrase() -> bytes:
    """For OpenSSL, which would otherwise ask for an encrypted key's passphrase on the
    terminal: an empty one, so an encrypted key fails to load at once."""
    return b""


def client_certificate(cert: Path, key: Path, where: str) -> None:
    """A certificate and its key that TLS can present: loaded now, so a mismatched pair is a
    config error naming the key, not a handshake failure later."""
    ctx = ssl.create_default_context()
    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"{where}: {cert} and its key cannot be loaded as a certificate and "
                          "its unencrypted private key") from None
