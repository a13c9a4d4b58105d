"""TLS material made by the tests themselves with the openssl command: a CA, and server
certificates it signs, for upstreams on 127.0.0.1; a client CA and client certificates it
signs, and server contexts that require them (mTLS)."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class ServerCert:
    key: Path
    cert: Path
    ca: Path     # what a client trusts to verify it

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def upstream_tls(directory: Path, names: tuple[str, ...] = ("localhost",),
            ips: tuple[str, ...] = ("127.0.0.1",)) -> ServerCert:
    """A CA of the test's own and a server certificate it signed for *names* and *ips*."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "upstream-ca-key.pem", directory / "upstream-ca.pem"
    key, csr, crt = (directory / "upstream-key.pem", directory / "upstream.csr",
                     directory / "upstream.pem")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
             "-subj", "/CN=tokenproxy tests upstream CA")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{i}" for i in ips])
    ext = directory / "upstream.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "1", "-extfile", str(ext))
    return ServerCert(key, crt, ca_crt)


def client_hello(server_hostname: str | None = "localhost") -> bytes:
    """The bytes of a real TLS ClientHello (Python's ssl, SNI *server_hostname*), made in
    memory, for tests that send one where it does not belong."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass(frozen=True)
class ClientCert:
    """A client certificate (and its key, mode 0600) that the client CA *ca* signed."""

    key: Path
    cert: Path
    ca: Path     # what a server requiring client certificates trusts
    cn: str


def client_tls(directory: Path, cn: str) -> ClientCert:
    """A client certificate for *cn* (clientAuth), signed by the client CA of *directory*
    (made there on first use, then reused: every client of *directory* has the same CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "client-ca-key.pem", directory / "client-ca.pem"
    if not ca_crt.exists():
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
                 "-subj", "/CN=tokenproxy tests client CA")
    stem = "client-" + "".join(c if c.isalnum() else "-" for c in cn)
    key, csr, crt = (directory / f"{stem}-key.pem", directory / f"{stem}.csr",
                     directory / f"{stem}.pem")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    key.chmod(0o600)
    ext = directory / f"{stem}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "1", "-extfile", str(ext))
    return ClientCert(key, crt, ca_crt, cn)


def mtls_context(server: ServerCert, client_ca: Path) -> ssl.SSLContext:
    """A server context for *server* that requires a client certificate signed by
    *client_ca* (CERT_REQUIRED: a client without one fails the handshake)."""
    ctx = server.server_context()
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


def peer_cn(peercert: object) -> str | None:
    """The subject CN of a verified peer certificate as ssl's getpeercert() gives it."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
