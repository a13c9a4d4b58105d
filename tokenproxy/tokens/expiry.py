"""Expiry arithmetic: pure functions over seconds."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Final

from tokenproxy.tokens.grant import MAX_LIFETIME, parse_expires_in

MIN_REFRESH_GAP: Final = 1.0   # never refresh proactively more often than this


def jwt_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT (decoded, not verified), as Unix time; None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(claims, dict):
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return float(exp)
    except OverflowError:   # an integer beyond float range
        return None


def lifetime(expires_in: float | None, token: str, now_wall: float) -> float | None:
    """Seconds the token lives: expires_in, else the JWT exp, else unknown (None)."""
    if expires_in is not None:
        return expires_in
    exp = jwt_exp(token)
    if exp is None:
        return None
    return parse_expires_in(min(exp - now_wall, MAX_LIFETIME))


def refresh_delay(life: float, margin: float) -> float:
    """Seconds after obtaining a token at which to refresh it: the margin, capped at half the
    lifetime, with a floor so a very short lifetime cannot make a refresh loop."""
    return max(life - min(margin, life / 2), MIN_REFRESH_GAP)
