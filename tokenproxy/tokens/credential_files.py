"""Credentials made elsewhere that a provider reads from files at each token request: a
projected service-account token, a JWT-SVID, a client assertion, a subject or actor token."""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import os
import stat
from pathlib import Path
from typing import Any, Final

from tokenproxy import log
from tokenproxy.log import Redactor
from tokenproxy.tokens.grant import GrantFailed, strict_json

# A projected token or an SVID is a few KiB; anything near this is not one.
MAX_CREDENTIAL_FILE: Final = 64 * 1024


def jwt_expiry(text: str) -> float | None:
    """The ``exp`` of *text* when it is a JWT carrying one; None otherwise (an opaque token).
    Read, not verified: whoever receives it verifies it; we only avoid presenting a dead one
    (so the claims are read as JSON, with no JOSE library to load for it)."""
    parts = text.split(".")
    if len(parts) != 3:
        return None
    claims = _json_segment(parts[1])
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        value = float(exp)
    except OverflowError:   # an integer beyond float range: no expiry worth the name
        return None
    return value if math.isfinite(value) else None


class CredentialFile:
    """A file whose content is presented at each token request, read afresh every time (a
    kubelet rotates a projected token in place, through a symlink swap)."""

    def __init__(self, path: Path, key: str, provider: str, redactor: Redactor,
                 timeout: float) -> None:
        self.path = path
        self._timeout = timeout   # a read from a hung mount must not hold the call for ever
        self._key = key          # the config key naming it, for messages
        self._provider = provider
        self._redactor = redactor
        self._log = log.get_logger(provider=provider)

    async def read(self, now_wall: float) -> str:
        """The content, stripped. Raises GrantFailed naming the path when the file cannot be
        read, is empty, or holds a JWT whose own ``exp`` has passed."""
        try:
            async with asyncio.timeout(self._timeout):
                text = await asyncio.to_thread(self._read)
        except TimeoutError:
            raise GrantFailed(f"{self._key} {self.path}: reading it took longer than "
                              f"{self._timeout:g} s") from None
        except OSError as exc:
            raise GrantFailed(f"{self._key} {self.path}: cannot read it "
                              f"({exc.strerror or type(exc).__name__})") from None
        except ValueError as exc:
            raise GrantFailed(f"{self._key} {self.path}: {exc}") from None
        self._redactor.track(f"{self._provider}:{self._key}", text)
        exp = jwt_expiry(text)
        if exp is not None and exp <= now_wall:
            self._log.warning(log.ASSERTION_EXPIRED, key=self._key, path=str(self.path),
                              expired_s_ago=round(now_wall - exp))
            raise GrantFailed(f"{self._key} {self.path}: the JWT in it has expired")
        return text

    def _read(self) -> str:
        # Symlinks followed (a projected token is one); O_NONBLOCK so a FIFO put in its place
        # cannot hang the thread; only a regular file is read.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = b""
            while len(data) <= MAX_CREDENTIAL_FILE:
                chunk = os.read(fd, MAX_CREDENTIAL_FILE + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        if len(data) > MAX_CREDENTIAL_FILE:
            raise ValueError(f"larger than {MAX_CREDENTIAL_FILE // 1024} KiB")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        if not text:
            raise ValueError("it is empty")
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
            raise ValueError("it holds more than one printable token")
        return text


def _json_segment(segment: str) -> Any:
    """A base64url JSON segment of a compact JWS, or None."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return strict_json(raw)
    except (binascii.Error, ValueError, GrantFailed):
        return None
