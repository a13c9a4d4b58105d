"""The forward proxy's local certificate authority: it signs short-lived certificates for the
intercepted hosts, and for nothing else.

The CA tokenproxy generates carries critical X.509 Name Constraints that permit the intercepted
names only and exclude every IP address (unless one is intercepted), so a verifier refuses a
certificate for any other site even when the CA key has leaked. Its files live in the state
directory: the key 0600, written to a fresh file (O_CREAT|O_EXCL|O_NOFOLLOW) renamed into place,
never read through a symlink. It is made again when the intercepted names change, when it nears
its expiry, or when its key file became readable by others. An operator's own CA is loaded as
it is; it is refused when broken, when its key does not match, or when its own constraints
forbid an intercepted name.

Nothing here logs: the caller reports ``LocalCA.created``. Key material is never formatted into
a message, and a leaf key reaches ``ssl`` through a memfd (or, without one, a 0700 temporary
directory) that is gone as soon as ``load_cert_chain`` returns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import secrets
import socket
import ssl
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokenproxy.clock import Clock
from tokenproxy.errors import TokenProxyError

CA_LIFETIME: Final = dt.timedelta(days=365)
CA_RENEW_BEFORE: Final = dt.timedelta(days=30)
LEAF_LIFETIME: Final = dt.timedelta(hours=24)
LEAF_RENEW_BEFORE: Final = dt.timedelta(hours=1)
# Certificates start a little in the past: a client whose clock is slightly behind still
# accepts one made a moment ago.
BACKDATE: Final = dt.timedelta(minutes=5)
# Bounds the cache: "*.example.com" lets a client ask for any number of distinct names.
MAX_LEAVES: Final = 256
MAX_FILE: Final = 1 << 20
# RFC 6761 reserves .invalid: permitting only it leaves a CA that intercepts no names (IP
# literals only) unable to sign for any real one. With no dNSName subtree at all, DNS names
# would be unconstrained (RFC 5280 applies constraints per name type).
NO_NAMES: Final = "invalid"
_EVERY_IP: Final = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
Host = str | IPAddr
CAKey = (ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
         | ed448.Ed448PrivateKey)


class CAError(TokenProxyError):
    """The CA cannot be used, or cannot sign for a name; the message names the file or name."""

    cause = "config"


@dataclass(frozen=True)
class CAFiles:
    cert: Path
    key: Path


# -- names -----------------------------------------------------------------------------------


def _host(text: str) -> Host:
    """A host as a certificate names it: an IP address, or a lower-case DNS name without the
    root dot. CAError when it is neither."""
    bare = text.lower()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(bare)
        # A zone ("fe80::1%eth0") means nothing outside this machine and a SAN cannot hold it.
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise CAError(f"{text!r}: an IPv6 address with a zone cannot be in a certificate")
        return ip
    bare = bare.removesuffix(".")
    labels = bare.split(".")
    if len(bare) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CAError(f"{text!r} is not a host name or IP address")
    return bare


@dataclass(frozen=True)
class _Names:
    """The names the CA may sign for: exact names, the bases of "*.base" (one label under
    base), and IP literals."""

    exact: frozenset[str]
    wildcard: frozenset[str]
    ips: frozenset[IPAddr]

    @classmethod
    def parse(cls, permitted: Sequence[str]) -> _Names:
        exact: set[str] = set()
        wildcard: set[str] = set()
        ips: set[IPAddr] = set()
        for entry in permitted:
            if entry.startswith("*."):
                wildcard.add(_wildcard_base(entry))
                continue
            host = _host(entry)
            if isinstance(host, str):
                exact.add(host)
            else:
                ips.add(host)
        return cls(frozenset(exact), frozenset(wildcard), frozenset(ips))

    def entries(self) -> list[Host]:
        """Every permitted entry, a wildcard as "*.base"."""
        ips = sorted(self.ips, key=lambda ip: (ip.version, int(ip)))
        return [*sorted(self.exact), *(f"*.{b}" for b in sorted(self.wildcard)), *ips]

    def allows(self, host: Host) -> bool:
        if isinstance(host, str):
            return host in self.exact or host.partition(".")[2] in self.wildcard
        return host in self.ips

    def constraints(self) -> x509.NameConstraints:
        """What the generated CA carries. RFC 5280: a dNSName subtree "example.com" permits
        example.com and every name under it, at any depth. So "*.example.com" (one label
        under) permits a leaked key to sign for example.com and a.b.example.com as well, and an
        exact "api.example.com" for x.api.example.com; the constraint cannot say "one label"
        or "this name only". It still keeps every other domain out, which is its purpose;
        the one-label rule is enforced where leaves are issued (``allows``)."""
        dns = sorted(self.exact | self.wildcard) or [NO_NAMES]
        ips = sorted(self.ips, key=lambda ip: (ip.version, int(ip)))
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        permitted += [x509.IPAddress(ipaddress.ip_network(ip)) for ip in ips]
        # An IP family with nothing permitted is excluded whole; one with a permitted address
        # is limited to the permitted /32 or /128 (an exclusion would override them).
        excluded: list[x509.GeneralName] = [
            x509.IPAddress(net) for net in _EVERY_IP
            if not any(ip.version == net.version for ip in self.ips)]
        return x509.NameConstraints(permitted, excluded or None)


def _wildcard_base(entry: str) -> str:
    base = _host(entry[2:])
    # "*.com" would make the CA good for a whole top-level domain.
    if not isinstance(base, str) or "." not in base:
        raise CAError(f"{entry!r}: a wildcard needs a domain of at least two labels after '*.'")
    return base


# -- what a CA's name constraints permit (operator CAs) --------------------------------------


def _in_dns_subtree(name: str, subtree: str) -> bool:
    """RFC 5280: the name itself or any name under it. OpenSSL also reads a leading dot as
    "under it only". A "*.base" name has "*" as a label, so it is inside exactly the subtrees
    that hold every name one label under base."""
    subtree = subtree.lower()
    if subtree.startswith("."):
        return name.endswith(subtree)
    return subtree in ("", name) or name.endswith("." + subtree)


def _dns_excluded(name: str, subtree: str) -> bool:
    """Whether an excluded subtree takes away *name*, or any one name a "*.base" stands for."""
    if _in_dns_subtree(name, subtree):
        return True
    return (name.startswith("*.") and not subtree.startswith(".")
            and subtree.lower().partition(".")[2] == name[2:])


def _permits(nc: x509.NameConstraints, name: Host) -> bool:
    """RFC 5280 for one name: inside a permitted subtree of its type when there are any of
    that type, and inside no excluded one."""
    if isinstance(name, str):
        return _permits_dns(nc, name)
    allowed = _networks(nc.permitted_subtrees)
    denied = _networks(nc.excluded_subtrees)
    return ((not allowed or any(name in net for net in allowed))
            and not any(name in net for net in denied))


def _networks(subtrees: list[x509.GeneralName] | None) -> list[IPNet]:
    return [g.value for g in subtrees or []
            if isinstance(g, x509.IPAddress) and isinstance(g.value, IPNet)]


def _permits_dns(nc: x509.NameConstraints, name: str) -> bool:
    allowed = [g.value for g in nc.permitted_subtrees or [] if isinstance(g, x509.DNSName)]
    denied = [g.value for g in nc.excluded_subtrees or [] if isinstance(g, x509.DNSName)]
    return ((not allowed or any(_in_dns_subtree(name, t) for t in allowed))
            and not any(_dns_excluded(name, t) for t in denied))


def _constraints_of(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _same_constraints(a: x509.NameConstraints | None, b: x509.NameConstraints) -> bool:
    # As sets: the order of the subtrees means nothing.
    return (a is not None
            and set(a.permitted_subtrees or []) == set(b.permitted_subtrees or [])
            and set(a.excluded_subtrees or []) == set(b.excluded_subtrees or []))


# -- certificates ----------------------------------------------------------------------------


def _now(clock: Clock) -> dt.datetime:
    # Whole seconds: certificates hold no fractions, and the cache compares with what they say.
    return dt.datetime.fromtimestamp(int(clock.time()), dt.UTC)


def _signing_hash(key: CAKey) -> hashes.SHA256 | None:
    # Ed25519 and Ed448 sign the message itself; the others sign a SHA-256 digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _spki(cert_or_key: x509.Certificate | CAKey) -> bytes:
    public = cert_or_key.public_key()
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _ca_subject() -> x509.Name:
    prefix = "tokenproxy local CA ("
    room = 64 - len(prefix) - 1   # a commonName holds at most 64 characters
    return x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, f"{prefix}{socket.gethostname()[:room]})")])


def _new_ca(names: _Names, now: dt.datetime) -> tuple[x509.Certificate, CAKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _ca_subject()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
        # path_length=0: a leaked key cannot make an intermediate that escapes the limits.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        # TLS servers only: verifiers that chain extended key usage (OpenSSL, Windows, NSS)
        # then refuse its certificates for e-mail or code signing.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(names.constraints(), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_subject(host: Host) -> x509.Name:
    """The SAN is what clients check; a CN is for people, and holds at most 64 characters.
    None for an IP: OpenSSL checks the CN of a certificate without a dNSName SAN against the
    DNS name constraints, and an IP there is outside them."""
    if not isinstance(host, str) or len(host) > 64:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])


def _new_leaf(host: Host, ca_cert: x509.Certificate, ca_key: CAKey, now: dt.datetime,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    san: x509.GeneralName = (x509.DNSName(host) if isinstance(host, str)
                             else x509.IPAddress(host))
    subject = _leaf_subject(host)
    # A leaf outliving its CA would fail verification for its last hours.
    not_after = min(now + LEAF_LIFETIME, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # RFC 5280: the SAN is critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName([san]), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, _signing_hash(ca_key))
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CAKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- files -----------------------------------------------------------------------------------


def _read(path: Path, *, follow: bool) -> tuple[bytes, int]:
    """A small regular file's bytes and mode. O_NONBLOCK: a FIFO must not hang the start.
    *follow* False refuses a symlink (ELOOP); an operator's files may be one (Kubernetes
    mounts secrets as symlinks)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CAError(f"{path}: not a regular file")
        # One read: a regular file gives all it has, up to the limit.
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise CAError(f"{path}: larger than {MAX_FILE} bytes, not a PEM file")
    return data, mode


def _parse_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def _parse_key(path: Path, data: bytes) -> CAKey:
    """The private key in *data*. Messages are tokenproxy's own: a parser's could quote
    what it read."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{path}: the key is encrypted; tokenproxy needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CAError(f"{path}: not a PEM private key") from None
    if not isinstance(key, CAKey):
        raise CAError(f"{path}: a {type(key).__name__} cannot sign certificates; "
                      "use an EC, RSA or Ed25519 key")
    return key


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace *path* with *data*: a new file (never an existing one, never through a
    symlink) made with *mode*, synced, then renamed over the old name, so a crash leaves the
    old file or the new one whole."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stray_temps(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)   # exactly: the umask could leave the certificate unreadable
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_stray_temps(path: Path) -> None:
    # A crash between creating a temporary file and renaming it would leave key material.
    for stray in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- tokenproxy's own CA ---------------------------------------------------------------------


def _read_own(files: CAFiles) -> tuple[x509.Certificate, CAKey] | str:
    """The CA tokenproxy made earlier, or why there is none to keep. A missing or damaged
    file is made again; one that cannot be opened (a symlink, no permission) is an error, as
    replacing it could hide what happened to it."""
    try:
        cert_data, _ = _read(files.cert, follow=False)
        key_data, key_mode = _read(files.key, follow=False)
    except FileNotFoundError as exc:
        return f"{exc.filename} did not exist"
    except OSError as exc:
        problem = ("is a symbolic link; tokenproxy's own CA files never are"
                   if exc.errno == errno.ELOOP else exc.strerror)
        raise CAError(f"{exc.filename}: {problem}") from None
    if key_mode & 0o077:
        return f"{files.key} was readable by others (mode {oct(stat.S_IMODE(key_mode))})"
    try:
        cert = _parse_cert(cert_data)
    except ValueError:
        return f"{files.cert} held no PEM certificate"
    try:
        key = _parse_key(files.key, key_data)
    except CAError:
        return f"{files.key} held no usable private key"
    return cert, key


def _stale(cert: x509.Certificate, key: CAKey, names: _Names, now: dt.datetime) -> str | None:
    """Why the existing CA must be made again, or None to keep it."""
    if _spki(cert) != _spki(key):
        return "its key did not match its certificate"
    if cert.not_valid_before_utc > now:
        return "it was not valid yet (the clock went back)"
    if cert.not_valid_after_utc - now < CA_RENEW_BEFORE:
        return f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}, within 30 days"
    # Exactly: a name the config dropped must not stay signable either.
    if not _same_constraints(_constraints_of(cert), names.constraints()):
        return "the intercepted names changed"
    return None


def _own_ca(files: CAFiles, names: _Names,
            now: dt.datetime) -> tuple[x509.Certificate, CAKey, str | None]:
    existing = _read_own(files)
    reason = existing if isinstance(existing, str) else _stale(*existing, names, now)
    if reason is None and not isinstance(existing, str):
        return existing[0], existing[1], None
    cert, key = _new_ca(names, now)
    # The key first: a crash between the two leaves a pair that does not match, made again
    # at the next start.
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, _pem(cert), 0o644)
    return cert, key, reason


# -- an operator's CA ------------------------------------------------------------------------


def _read_operator(path: Path) -> bytes:
    try:
        return _read(path, follow=True)[0]
    except FileNotFoundError:
        raise CAError(f"{path}: no such file") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot be read: {exc.strerror}") from None


def _check_signer(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    """CAError unless *cert* can sign server certificates now."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CAError(f"{path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    with contextlib.suppress(x509.ExtensionNotFound):
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise CAError(f"{path}: its key usage does not allow signing certificates")
    if cert.not_valid_after_utc <= now:
        raise CAError(f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise CAError(f"{path}: not valid before "
                      f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _operator_ca(files: CAFiles, names: _Names,
                 now: dt.datetime) -> tuple[x509.Certificate, CAKey]:
    try:
        cert = _parse_cert(_read_operator(files.cert))
    except ValueError:
        raise CAError(f"{files.cert}: not a PEM certificate") from None
    key = _parse_key(files.key, _read_operator(files.key))
    if _spki(cert) != _spki(key):
        raise CAError(f"{files.key}: this key does not belong to the certificate {files.cert}")
    _check_signer(files.cert, cert, now)
    # An operator's CA need not carry constraints; if it does, they must allow every name.
    nc = _constraints_of(cert)
    refused = [] if nc is None else [n for n in names.entries() if not _permits(nc, n)]
    if refused:
        raise CAError(f"{files.cert}: its name constraints do not permit "
                      + ", ".join(map(str, refused)))
    return cert, key


# -- leaves into ssl -------------------------------------------------------------------------


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    """*data* in anonymous memory, under a path valid while the block runs."""
    fd = os.memfd_create("tokenproxy-leaf", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@contextlib.contextmanager
def _private_temp(data: bytes) -> Iterator[str]:
    """*data* in a file of a fresh 0700 directory, both removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="tokenproxy-leaf-") as folder:
        path = os.path.join(folder, "leaf.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path


def _private_file(data: bytes) -> contextlib.AbstractContextManager[str]:
    # ssl.SSLContext loads a certificate and key only from a path. A memfd never reaches a
    # disk; where there is none (or no /proc), a private temporary directory.
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        return _memfd(data)
    return _private_temp(data)


def _server_context(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    with _private_file(_key_pem(key) + _pem(cert)) as path:
        ctx.load_cert_chain(path)
    return ctx


@dataclass(frozen=True)
class _Leaf:
    context: ssl.SSLContext
    not_before: float
    renew_at: float

    def fresh(self, now: float) -> bool:
        # Before not_before too: the wall clock went back past it.
        return self.not_before <= now < self.renew_at


class LocalCA:
    """A CA certificate and key, and the server contexts it signed, one per host."""

    def __init__(self, cert: x509.Certificate, key: CAKey, path: Path, names: _Names,
                 clock: Clock, created: str | None) -> None:
        self._cert = cert
        self._key = key
        self._names = names
        self._clock = clock
        self._leaves: dict[str, _Leaf] = {}
        self.path = path
        self.cert_pem = _pem(cert)
        # Why this load made the CA (for the caller to log); None when it was kept or given.
        self.created = created

    def __repr__(self) -> str:   # never the key
        return f"<LocalCA {self.path}>"

    @classmethod
    def load_or_create(cls, files: CAFiles, permitted: Sequence[str], *, clock: Clock,
                       generated: bool) -> LocalCA:
        """The CA for *permitted* names ("host", "*.domain" or an IP literal). *generated*:
        the files are tokenproxy's own, made (again) as needed; otherwise an operator's,
        only loaded. CAError says which file is unusable and why."""
        names = _Names.parse(permitted)
        now = _now(clock)
        if generated:
            cert, key, created = _own_ca(files, names, now)
        else:
            cert, key = _operator_ca(files, names, now)
            created = None
        return cls(cert, key, files.cert, names, clock, created)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting a certificate for *host*, made on first use and
        again an hour before it expires. CAError for a host this CA does not sign for."""
        name = _host(host)
        if not self._names.allows(name):
            raise CAError(f"{host}: not among the names this CA signs for")
        now = self._clock.time()
        leaf = self._leaves.pop(str(name), None)
        if leaf is None or not leaf.fresh(now):
            leaf = self._issue(name)
        self._leaves[str(name)] = leaf   # last: the dict's order is the eviction order
        while len(self._leaves) > MAX_LEAVES:
            del self._leaves[next(iter(self._leaves))]
        return leaf.context

    def _issue(self, host: Host) -> _Leaf:
        now = _now(self._clock)
        cert, key = _new_leaf(host, self._cert, self._key, now)
        renew_at = cert.not_valid_after_utc - LEAF_RENEW_BEFORE
        return _Leaf(_server_context(cert, key), cert.not_valid_before_utc.timestamp(),
                     renew_at.timestamp())
