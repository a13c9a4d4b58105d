"""Signing keys of the tests' own (made with ``cryptography``), written as private PEM files
with mode 0600, their public halves in the verifier's form (joserfc keys: the fake token
endpoint of tests/helpers/assertion_issuer.py checks signatures with joserfc, not with PyJWT
as tokenproxy signs); "external" JWTs signed with joserfc, like a Kubernetes projected
service-account token; the mTLS material of a test process; and files replaced the way
Kubernetes rotates a projected token (a new inode)."""

from __future__ import annotations

import functools
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from tests.helpers.tls import ClientCert, ServerCert, client_tls, upstream_tls

JoseKey = RSAKey | ECKey | OKPKey

# The key types a private_key_jwt client may have, and the alg tokenproxy derives from each.
KINDS: Final = ("rsa", "p256", "p384", "ed25519")
DEFAULT_ALG: Final = {"rsa": "RS256", "p256": "ES256", "p384": "ES384", "ed25519": "EdDSA"}

# A Kubernetes projected service-account token's issuer and subject (the look-alike's).
K8S_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
K8S_SUBJECT: Final = "system:serviceaccount:apps:tokenproxy"


@functools.cache
def _private_key(kind: str, slot: int) -> Any:
    """One key per (kind, slot) and test process: RSA 2048 takes a while to make."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def _jose(pem: bytes, kind: str) -> JoseKey:
    cls: type[JoseKey] = {"rsa": RSAKey, "p256": ECKey, "p384": ECKey,
                          "ed25519": OKPKey}[kind]  # type: ignore[assignment]
    return cls.import_key(pem)


@dataclass(frozen=True)
class KeyPair:
    """A private key in a PEM file and its public half for the verifier."""

    kind: str
    path: Path          # the private key, PEM, mode 0600 unless asked otherwise
    pem: bytes          # the file's content: what must never show in logs or output
    public: JoseKey     # the public key only, as joserfc verifies with it
    private: JoseKey = field(repr=False)   # for signing external JWTs in the tests

    @property
    def alg(self) -> str:
        """The alg tokenproxy should derive from the key."""
        return DEFAULT_ALG[self.kind]

    @property
    def secret_text(self) -> str:
        """The base64 body of the PEM (no header lines): a leak of any of it shows this."""
        lines = self.pem.decode().splitlines()
        return "".join(line for line in lines if not line.startswith("-----"))


def make_key(directory: Path, kind: str = "rsa", *, name: str | None = None, slot: int = 0,
             traditional: bool = False, mode: int = 0o600) -> KeyPair:
    """Write a private key of *kind* (rsa, p256, p384, ed25519) to *directory* as PEM --
    PKCS#8, or the traditional RSA/EC form -- with *mode*; another *slot* is another key."""
    key = _private_key(kind, slot)
    fmt = serialization.PrivateFormat.PKCS8
    if traditional:
        if kind == "ed25519":
            raise ValueError("Ed25519 has no traditional PEM form")
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{kind}-{slot}{'-trad' if traditional else ''}.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.chmod(mode)
    return KeyPair(kind, path, pem, _jose(public_pem, kind), _jose(pem, kind))


def sign(signer: KeyPair, claims: dict[str, Any], *, kid: str | None = None,
         alg: str | None = None, typ: str = "JWT") -> str:
    """A JWT of *claims* signed by *signer* with joserfc (never with tokenproxy's PyJWT)."""
    alg = alg or signer.alg
    header: dict[str, Any] = {"alg": alg, "typ": typ}
    if kid is not None:
        header["kid"] = kid
    with warnings.catch_warnings():   # EdDSA: "deprecated via RFC 9864"
        warnings.simplefilter("ignore", SecurityWarning)
        return jwt.encode(header, claims, signer.private, algorithms=[alg])


def external_jwt(signer: KeyPair, now: float, *, lifetime: float = 3600,
                 iss: str = K8S_ISSUER, sub: str = K8S_SUBJECT, aud: str | list[str] = "sts",
                 kid: str | None = "k8s-key", **extra: Any) -> str:
    """A JWT made elsewhere, like a Kubernetes projected service-account token: iss, sub,
    aud, iat = nbf = *now*, exp = *now* + *lifetime*, a jti, and the kubernetes.io claim."""
    claims: dict[str, Any] = {
        "iss": iss, "sub": sub, "aud": aud, "iat": int(now), "nbf": int(now),
        "exp": int(now + lifetime), "jti": str(uuid.uuid4()),
        "kubernetes.io": {"namespace": "apps", "serviceaccount": {"name": "tokenproxy"}},
    }
    claims.update(extra)
    return sign(signer, claims, kid=kid)


def write_file(path: Path, text: str, mode: int = 0o600) -> Path:
    """Put *text* in *path* as a new inode (how the kubelet rotates a projected token: a
    reader never sees half a file), with *mode*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Pki:
    """A test process's mTLS material: the server certificate (localhost, 127.0.0.1) of
    token endpoints and upstreams, and client certificates a client CA signed."""

    server: ServerCert
    proxy: ClientCert       # tokenproxy's client certificate
    other: ClientCert       # another client's (a certificate the token endpoint has not
                            # registered for the client)


def pki(directory: Path) -> Pki:
    """A Pki made in *directory* with openssl (a session-scoped fixture makes it once per
    test process: tests only read it)."""
    return Pki(upstream_tls(directory), client_tls(directory, "tokenproxy-client"),
               client_tls(directory, "someone-else"))
