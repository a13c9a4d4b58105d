"""Private keys and certificates a config names for signing assertions: loaded at load time,
so a bad one is a config error naming its key.

Its own module, imported only by configs that name a key: the cryptography package it loads
is megabytes of memory a daemon without one does not need.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenproxy.config.named_files import read_named_file
from tokenproxy.errors import ConfigError

# The JWS algorithms a key of each kind may sign with; the first is its default.
RSA_ALGS: Final = ("RS256", "PS256")
EC_ALGS: Final = MappingProxyType({"secp256r1": ("ES256",), "secp384r1": ("ES384",)})
ED_ALGS: Final = ("EdDSA",)
MIN_RSA_BITS: Final = 2048

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def signing_key(path: Path, where: str) -> tuple[SigningKey, tuple[str, ...]]:
    """The private key in PEM file *path* and the algorithms it can sign with (the default
    first): RSA of 2048 bits or more, EC on P-256 or P-384, Ed25519. Unencrypted: a
    passphrase would have to sit beside it anyway."""
    data = read_named_file(path, where)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never the library's message: it may quote the file.
        raise ConfigError(f"{where}: {path} holds no unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: an RSA key needs {MIN_RSA_BITS} bits or more")
        return key, RSA_ALGS
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_ALGS:
        return key, EC_ALGS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, ED_ALGS
    raise ConfigError(f"{where}: expected an RSA, EC (P-256 or P-384) or Ed25519 key")


def certificate_of(key: SigningKey, path: Path, where: str) -> x509.Certificate:
    """The PEM certificate in *path*, which must be *key*'s."""
    try:
        cert = x509.load_pem_x509_certificate(read_named_file(path, where))
    except ValueError:
        raise ConfigError(f"{where}: {path} holds no PEM certificate") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, public)
            != key.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ConfigError(f"{where}: {path} is not the certificate of private_key_file")
    return cert
