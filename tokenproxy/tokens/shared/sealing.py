"""What the shared state holds for a provider, sealed: AES-256-GCM with a random 96-bit nonce
per value, the key id beside it (keys rotate: the first key seals, every key opens), and the
Redis key name and version as associated data, so a value copied under another identity, or
put back alone after a newer one was written, does not open.

Without keys, values are stored in clear; with keys, a clear value is refused, since whoever
can write Redis could otherwise choose the token the upstream receives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENVELOPE: Final = 1
_KID: Final = re.compile(r"[0-9a-f]{8}")
NONCE_BYTES: Final = 12


class Unreadable(Exception):
    """A stored value this replica cannot open; the message says why (never the value)."""


def key_id(key: bytes) -> str:
    """A short public name for a key: the start of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


class Sealer:
    def __init__(self, keys: Sequence[bytes]) -> None:
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self._sealing = key_id(keys[0]) if keys else None

    @property
    def encrypts(self) -> bool:
        return self._sealing is not None

    def seal(self, doc: dict[str, Any], name: bytes) -> bytes:
        plain = json.dumps(doc, separators=(",", ":")).encode()
        if self._sealing is None:
            return json.dumps({"v": ENVELOPE, "clear": doc}).encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._sealing].encrypt(nonce, plain, name)
        return json.dumps({"v": ENVELOPE, "kid": self._sealing,
                           "nonce": _b64(nonce), "ct": _b64(sealed)}).encode()

    def open(self, blob: bytes, name: bytes) -> Any:
        try:
            envelope = json.loads(blob)
        except (ValueError, UnicodeDecodeError):
            raise Unreadable("not a tokenproxy entry") from None
        if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE:
            raise Unreadable("not a tokenproxy entry (unknown format)")
        if "clear" in envelope:
            if self._sealing is not None:
                raise Unreadable("stored in clear text, but encryption_key_file is set: "
                                 "refused (whoever wrote it could choose the token)")
            return envelope["clear"]
        kid = envelope.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise Unreadable("encrypted, but its key id is not one tokenproxy writes")
        if self._sealing is None:
            raise Unreadable(f"encrypted (key id {kid}), but no encryption_key_file is set")
        aead = self._keys.get(kid)
        if aead is None:
            raise Unreadable(f"encrypted with key id {kid}, which encryption_key_file does "
                             f"not hold (it holds {', '.join(self._keys)})")
        try:
            plain = aead.decrypt(_unb64(envelope.get("nonce")), _unb64(envelope.get("ct")),
                                 name)
            return json.loads(plain)
        except (InvalidTag, ValueError, TypeError):
            raise Unreadable(f"does not decrypt with key id {kid} (altered, or stored under "
                             "another name)") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    return base64.b64decode(text, validate=True)
