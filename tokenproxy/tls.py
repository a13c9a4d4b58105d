"""TLS client contexts for what a config names: extra CA files, and client certificates for
mTLS (upstreams and token endpoints)."""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from tokenproxy.config.values import ClientTls


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """A context verifying with the system roots (and the extra CA file, if any), presenting
    the client certificate, if any."""
    ctx = ssl.create_default_context()
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), None if tls.key_file is None
                            else str(tls.key_file))
    return ctx


def ssl_contexts(settings: Iterable[ClientTls]) -> dict[ClientTls, ssl.SSLContext]:
    """One context per setting other than the default, built once."""
    out: dict[ClientTls, ssl.SSLContext] = {}
    for tls in settings:
        if not tls.default and tls not in out:
            out[tls] = client_context(tls)
    return out
