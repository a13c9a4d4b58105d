"""What a token endpoint answered, parsed without trusting it.

Token responses come from outside: JSON with NaN, duplicate keys, booleans for numbers, CR/LF in
tokens, 50 MB bodies. Everything here is strict, bounded and secret-free in its error messages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

from tokenproxy.tokens.source import is_usable_token

MAX_RESPONSE: Final = 64 * 1024
MAX_LIFETIME: Final = 86400.0   # a day: longer claims are capped, not trusted


@dataclass(frozen=True, slots=True)
class Grant:
    """A successful answer: the access token, its lifetime if known, a new refresh token if any."""

    access_token: str = field(repr=False)
    expires_in: float | None = None
    refresh_token: str | None = field(default=None, repr=False)
    expires_in_ignored: bool = False   # an expires_in was sent but was unusable
    id_token: str | None = field(default=None, repr=False)   # OpenID Connect: who logged in


class GrantFailed(Exception):
    """A failed call that may work later (network, 5xx, garbage): back off and retry."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.grant: str | None = None   # set by the token manager: which call failed
        self.refused = False            # a 4xx answer: counted as rejected, still retried


class GrantRejected(Exception):
    """The endpoint refused the grant itself (invalid_grant, invalid_client, 400/401/403)."""

    def __init__(self, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.grant: str | None = None


class LoginNeeded(GrantRejected):
    """No refresh token for a provider a person logs in to: nothing the daemon can call."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def strict_json(body: bytes) -> Any:
    """Parse JSON refusing NaN/Infinity and duplicate keys; raise GrantFailed otherwise."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constants,
                          object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GrantFailed("the answer is not valid JSON") from None


_MISSING: Final = object()


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901: the value at *pointer*, or None when any step is missing."""
    if pointer == "":
        return doc
    node = doc
    for raw in pointer[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else _MISSING
        else:
            return None
        if node is _MISSING:
            return None
    return node


def parse_expires_in(value: Any) -> float | None:
    """A finite positive number of seconds (digit strings accepted), capped at a day.

    Booleans, NaN, infinities, zero, negatives and anything else give None: the expiry then
    comes from the JWT or stays unknown. (x/oauth2 reads zero as "never expires"; we do not.)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        # ASCII only: str.isdigit() is also true for "²", which int() refuses.
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            return None
        value = int(text)
    if not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:   # an integer beyond float range: as unusable as 1e999
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_LIFETIME)


def grant_from(
    doc: Any,
    *,
    access_pointer: str = "/access_token",
    refresh_pointer: str | None = "/refresh_token",
    expires_pointer: str | None = "/expires_in",
) -> Grant:
    """Pick the grant out of a parsed answer; a missing or unusable token is a failure."""
    token = resolve_pointer(doc, access_pointer)
    if not isinstance(token, str) or not token:
        raise GrantFailed("the answer carries no access token")
    if not is_usable_token(token):
        raise GrantFailed("the access token contains characters a header cannot carry")
    refresh: str | None = None
    if refresh_pointer is not None:
        value = resolve_pointer(doc, refresh_pointer)
        if isinstance(value, str) and value:
            if len(value) > 16 * 1024 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
                raise GrantFailed("the refresh token contains unusable characters")
            refresh = value
    expires: float | None = None
    ignored = False
    if expires_pointer is not None:
        raw = resolve_pointer(doc, expires_pointer)
        expires = parse_expires_in(raw)
        ignored = raw is not None and expires is None
    id_token = resolve_pointer(doc, "/id_token")
    return Grant(token, expires, refresh, ignored,
                 id_token if isinstance(id_token, str) and len(id_token) <= 16384 else None)
