"""Proving who tokenproxy is without a shared secret: the JWTs it signs (RFC 7523 client
assertions and jwt-bearer grants), and the credentials made elsewhere that it reads from files
at each token request (a projected service-account token, a JWT-SVID, a subject token).

Signing is PyJWT's, over ``cryptography`` keys: the most used JOSE library for Python, with
RS/PS/ES/EdDSA on one small API. Nothing here builds a signature by hand.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tokenproxy import log
from tokenproxy.config.named_files import certificate_of, signing_key
from tokenproxy.log import Redactor
from tokenproxy.tokens.grant import GrantFailed

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Used once, at once; as long as RFC 7523 issuers commonly take (five minutes), so that an
# issuer whose clock runs ahead of ours by minutes still finds it unexpired.
ASSERTION_LIFETIME: Final = 300
# A projected token or an SVID is a few KiB; anything near this is not one.
MAX_CREDENTIAL_FILE: Final = 64 * 1024


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


def jwt_expiry(text: str) -> float | None:
    """The ``exp`` of *text* when it is a JWT carrying one; None otherwise (an opaque token).
    Read, not verified: whoever receives it verifies it; we only avoid presenting a dead one."""
    if text.count(".") != 2:
        return None
    try:
        claims = jwt.decode(text, options={"verify_signature": False, "verify_exp": False,
                                           "verify_nbf": False, "verify_iat": False,
                                           "verify_aud": False, "verify_iss": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        value = float(exp)
    except OverflowError:   # an integer beyond float range: no expiry worth the name
        return None
    return value if math.isfinite(value) else None


class CredentialFile:
    """A file whose content is presented at each token request, read afresh every time (a
    kubelet rotates a projected token in place, through a symlink swap)."""

    def __init__(self, path: Path, key: str, provider: str, redactor: Redactor,
                 timeout: float) -> None:
        self.path = path
        self._timeout = timeout   # a read from a hung mount must not hold the call for ever
        self._key = key          # the config key naming it, for messages
        self._provider = provider
        self._redactor = redactor
        self._log = log.get_logger(provider=provider)

    async def read(self, now_wall: float) -> str:
        """The content, stripped. Raises GrantFailed naming the path when the file cannot be
        read, is empty, or holds a JWT whose own ``exp`` has passed."""
        try:
            async with asyncio.timeout(self._timeout):
                text = await asyncio.to_thread(self._read)
        except TimeoutError:
            raise GrantFailed(f"{self._key} {self.path}: reading it took longer than "
                              f"{self._timeout:g} s") from None
        except OSError as exc:
            raise GrantFailed(f"{self._key} {self.path}: cannot read it "
                              f"({exc.strerror or type(exc).__name__})") from None
        except ValueError as exc:
            raise GrantFailed(f"{self._key} {self.path}: {exc}") from None
        self._redactor.track(f"{self._provider}:{self._key}", text)
        exp = jwt_expiry(text)
        if exp is not None and exp <= now_wall:
            self._log.warning(log.ASSERTION_EXPIRED, key=self._key, path=str(self.path),
                              expired_s_ago=round(now_wall - exp))
            raise GrantFailed(f"{self._key} {self.path}: the JWT in it has expired")
        return text

    def _read(self) -> str:
        # Symlinks followed (a projected token is one); O_NONBLOCK so a FIFO put in its place
        # cannot hang the thread; only a regular file is read.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = b""
            while len(data) <= MAX_CREDENTIAL_FILE:
                chunk = os.read(fd, MAX_CREDENTIAL_FILE + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        if len(data) > MAX_CREDENTIAL_FILE:
            raise ValueError(f"larger than {MAX_CREDENTIAL_FILE // 1024} KiB")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        if not text:
            raise ValueError("it is empty")
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
            raise ValueError("it holds more than one printable token")
        return text
