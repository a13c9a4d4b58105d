"""What the command line prints that came from elsewhere (an issuer, a token endpoint)."""

from __future__ import annotations


def visible(text: str) -> str:
    """*text* with control characters escaped: what an issuer or token endpoint sent must not
    drive the terminal it is printed on (clear it, retitle it, hide a line)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
