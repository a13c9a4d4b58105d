"""TLS client contexts for what a config names: extra CA files, and client certificates for
mTLS (upstreams and token endpoints)."""

from __future__ import annotations

import ssl

from tokenproxy.config.named_files import no_passphrase
from tokenproxy.config.values import ClientTls


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """A context verifying with the system roots (and the extra CA file, if any), presenting
    the client certificate, if any."""
    ctx = ssl.create_default_context()
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), None if tls.key_file is None
                            else str(tls.key_file), password=no_passphrase)
    return ctx


class ClientContexts:
    """Client contexts by setting, each built once: loading the system roots takes some 20 ms
    of the event loop, which a config with many upstreams (the forward proxy's intercepted
    hosts) would otherwise pay per upstream and per reload. One per config: a reload reads
    the files again."""

    def __init__(self) -> None:
        self._made: dict[ClientTls, ssl.SSLContext] = {}

    def context(self, tls: ClientTls) -> ssl.SSLContext:
        ctx = self._made.get(tls)
        if ctx is None:
            ctx = self._made[tls] = client_context(tls)
        return ctx
