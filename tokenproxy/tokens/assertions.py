"""Proving who tokenproxy is without a shared secret: the JWTs it signs (RFC 7523 client
assertions and jwt-bearer grants).

Signing is PyJWT's, over ``cryptography`` keys: the most used JOSE library for Python, with
RS/PS/ES/EdDSA on one small API. Nothing here builds a signature by hand. Imported only by
providers that sign (oauth2.py): PyJWT and cryptography are megabytes others do not need.
"""

from __future__ import annotations

import base64
import math
import secrets
import warnings
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tokenproxy.config.keys import certificate_of, signing_key

# Used once, at once; as long as RFC 7523 issuers commonly take (five minutes), so that an
# issuer whose clock runs ahead of ours by minutes still finds it unexpired.
ASSERTION_LIFETIME: Final = 300


class _NoSuchWarning(Warning):
    """Stands in where PyJWT is older than its short-key warning."""


_SHORT_KEY_WARNING: type[Warning] = getattr(jwt, "InsecureKeyLengthWarning", _NoSuchWarning)


class Signer:
    """Signs assertions with one key (or, for client_secret_jwt, the client secret)."""

    def __init__(self, key: Any, alg: str, key_id: str | None,
                 certificate: x509.Certificate | None = None) -> None:
        self._key = key
        self._alg = alg
        headers: dict[str, str] = {"kid": key_id} if key_id else {}
        if certificate is not None:
            # RFC 7515 sections 4.1.7 and 4.1.8. SHA-1 names the certificate, as the
            # header defines; it protects nothing.
            headers["x5t"] = _b64url(certificate.fingerprint(hashes.SHA1()))  # noqa: S303
            headers["x5t#S256"] = _b64url(certificate.fingerprint(hashes.SHA256()))
        self._headers = headers or None

    @classmethod
    def from_file(cls, path: Path, alg: str | None, key_id: str | None,
                  certificate: Path | None = None) -> Signer:
        key, algs = signing_key(path, "private_key_file")
        cert = (None if certificate is None
                else certificate_of(key, certificate, "assertion_certificate_file"))
        return cls(key, alg or algs[0], key_id, cert)

    @classmethod
    def hmac(cls, secret: str, key_id: str | None) -> Signer:
        return cls(secret.encode(), "HS256", key_id)

    def assertion(self, *, issuer: str, subject: str, audience: str, now: float) -> str:
        """A JWT for one token request: unique ``jti``, ``exp`` a minute after ``iat``."""
        issued = math.floor(now)
        claims = {"iss": issuer, "sub": subject, "aud": audience,
                  "jti": secrets.token_urlsafe(24), "iat": issued,
                  "exp": issued + ASSERTION_LIFETIME}
        with warnings.catch_warnings():
            # client_secret_jwt: the secret's length is the issuer's choice, not the
            # operator's; PyJWT would warn at every assertion below 32 bytes.
            warnings.simplefilter("ignore", _SHORT_KEY_WARNING)
            return jwt.encode(claims, self._key, algorithm=self._alg, headers=self._headers)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
