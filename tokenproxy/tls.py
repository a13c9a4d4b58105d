"""TLS client contexts for the extra CA files a config names (upstreams and token endpoints)."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path


def ssl_contexts(ca_files: Iterable[Path | None]) -> dict[Path, ssl.SSLContext]:
    """One context per extra CA file, built once. The system roots stay trusted too."""
    out: dict[Path, ssl.SSLContext] = {}
    for path in ca_files:
        if path is not None and path not in out:
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cafile=str(path))
            out[path] = ctx
    return out
