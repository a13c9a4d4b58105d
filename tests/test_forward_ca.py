"""The forward proxy's local CA (tokenproxy/forward/ca.py): the files it keeps, the leaves it
serves, and, checked with real verifiers (openssl verify and Python's ssl), that its key signs
for nothing but the intercepted names even when it has leaked."""

from __future__ import annotations

import ast
import datetime as dt
import ipaddress
import os
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers.fakes import JumpClock
from tests.helpers.logs import CapturedLogs
from tokenproxy.forward import ca as ca_module
from tokenproxy.forward.ca import CAError, CAFiles, LocalCA

NAMES = ["api.example.com", "*.example.net"]
HOST = "api.example.com"
# X509_V_ERR_PERMITTED_VIOLATION and X509_V_ERR_EXCLUDED_VIOLATION: refused for its name
# constraints, not for a host name mismatch.
NC_VIOLATIONS = (47, 48)

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
T = TypeVar("T", bound=x509.ExtensionType)


@pytest.fixture(name="now")
def _now() -> JumpClock:
    """A fake clock at the real time: openssl and Python's ssl check validity against it."""
    clock = JumpClock()
    clock.set_wall(time.time())
    return clock


@pytest.fixture(name="files")
def _files(tmp_path: Path) -> CAFiles:
    return CAFiles(cert=tmp_path / "state" / "ca.pem", key=tmp_path / "state" / "ca.key")


def own(files: CAFiles, clock: JumpClock, names: Sequence[str] = NAMES) -> LocalCA:
    return LocalCA.load_or_create(files, names, clock=clock, generated=True)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def extension(cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


# -- TLS in memory --------------------------------------------------------------------------------


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              host: str) -> ssl.SSLObject:
    """A TLS handshake over memory BIOs; the client's SSLObject once both sides finished. A
    verification failure raises from the client."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            client_done = _step(client)
        if not server_done:
            server_done = _step(server)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client_done and server_done:
            return client
    raise AssertionError("the handshake did not finish")


def _step(side: ssl.SSLObject) -> bool:
    try:
        side.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def trusting(ca_file: Path) -> ssl.SSLContext:
    """The client a tool builds from SSL_CERT_FILE, made strict as Python 3.13's default."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def served_leaf(server_ctx: ssl.SSLContext, host: str) -> x509.Certificate:
    """The certificate *server_ctx* presents, read by a client that checks nothing."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    der = handshake(server_ctx, client, host).getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serving(tmp_path: Path, chain: Sequence[x509.Certificate], key: Key) -> ssl.SSLContext:
    """A server context for a certificate the test made itself."""
    path = tmp_path / "served.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
                     + key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(path))
    return ctx


def openssl_verify(tmp_path: Path, ca_file: Path, leaf: x509.Certificate,
                   untrusted: x509.Certificate | None = None) -> subprocess.CompletedProcess[str]:
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    args = ["openssl", "verify", "-CAfile", str(ca_file)]
    if untrusted is not None:
        inter = tmp_path / "untrusted.pem"
        inter.write_bytes(untrusted.public_bytes(serialization.Encoding.PEM))
        args += ["-untrusted", str(inter)]
    return subprocess.run([*args, str(leaf_file)], capture_output=True, text=True, timeout=30,
                          check=False)


# -- certificates the test signs itself -----------------------------------------------------------


def sign(issuer: x509.Certificate, issuer_key: Key, *, sans: Sequence[x509.GeneralName] = (),
         cn: str | None = None, ca: bool = False) -> tuple[x509.Certificate, Key]:
    """A certificate signed by *issuer_key*, as anyone holding that key could make one."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or "leaked")]))
        .issuer_name(issuer.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def leaked_key(files: CAFiles) -> Key:
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def operator_ca(folder: Path, *, constraints: x509.NameConstraints | None = None,
                ca: bool = True, days: int = 30,
                use_rsa: bool = False) -> tuple[CAFiles, x509.Certificate, Key]:
    """An operator's own CA, written as PEM files (an RSA key in the traditional format when
    asked: slower to make, and signing with it takes the other path)."""
    folder.mkdir(parents=True, exist_ok=True)
    key: Key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if use_rsa
                else ec.generate_private_key(ec.SECP384R1()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator CA")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        # Python 3.13's strict verification refuses a CA without key usage.
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    cert = builder.sign(key, hashes.SHA256())
    files = CAFiles(cert=folder / "operator.pem", key=folder / "operator.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files, cert, key


def operator(files: CAFiles, clock: JumpClock, names: Sequence[str] = NAMES) -> LocalCA:
    return LocalCA.load_or_create(files, names, clock=clock, generated=False)


# -- the generated CA -----------------------------------------------------------------------------


def test_generated_ca_files_and_extensions(files: CAFiles, now: JumpClock) -> None:
    ca = own(files, now)

    assert 0o600 == stat.S_IMODE(files.key.stat().st_mode)
    assert 0o644 == stat.S_IMODE(files.cert.stat().st_mode)
    assert ["ca.key", "ca.pem"] == sorted(p.name for p in files.key.parent.iterdir())
    assert files.cert == ca.path
    assert files.cert.read_bytes() == ca.cert_pem
    assert ca.created is not None
    assert "did not exist" in ca.created
    cert = load(files.cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert "secp256r1" == key.curve.name
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert str(cn).startswith("tokenproxy local CA (")
    assert cert.subject == cert.issuer
    assert dt.timedelta(days=365, minutes=5) == cert.not_valid_after_utc - cert.not_valid_before_utc
    assert int(now.time()) + 365 * 86400 == cert.not_valid_after_utc.timestamp()

    basic = extension(cert, x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert 0 == basic.value.path_length
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    extension(cert, x509.SubjectKeyIdentifier)
    assert [ExtendedKeyUsageOID.SERVER_AUTH] == list(extension(cert, x509.ExtendedKeyUsage).value)
    nc = extension(cert, x509.NameConstraints)
    assert nc.critical
    # "*.example.net" permits the example.net subtree (RFC 5280 cannot say "one label").
    assert {x509.DNSName("api.example.com"), x509.DNSName("example.net")} == set(
        nc.value.permitted_subtrees or [])
    assert {x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0"))} == set(nc.value.excluded_subtrees or [])


def test_an_intercepted_ip_literal_is_permitted_alone(files: CAFiles, now: JumpClock) -> None:
    ca = own(files, now, ["api.example.com", "127.0.0.1"])

    nc = extension(load(files.cert), x509.NameConstraints).value
    assert {x509.DNSName("api.example.com"),
            x509.IPAddress(ipaddress.ip_network("127.0.0.1/32"))} == set(
        nc.permitted_subtrees or [])
    assert [x509.IPAddress(ipaddress.ip_network("::/0"))] == nc.excluded_subtrees
    client = handshake(ca.server_context("127.0.0.1"), trusting(files.cert), "127.0.0.1")
    assert "http/1.1" == client.selected_alpn_protocol()


def test_a_ca_for_ip_literals_only_permits_no_real_name(files: CAFiles, now: JumpClock) -> None:
    """Without a dNSName subtree DNS names would be unconstrained: .invalid (RFC 6761) stands
    in."""
    own(files, now, ["::1"])

    nc = extension(load(files.cert), x509.NameConstraints).value
    assert {x509.DNSName("invalid"), x509.IPAddress(ipaddress.ip_network("::1/128"))} == set(
        nc.permitted_subtrees or [])
    assert [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0"))] == nc.excluded_subtrees


# -- leaves, as real verifiers see them -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("host", [HOST, "a.example.net"])
def test_a_leaf_verifies_with_openssl_and_python(files: CAFiles, now: JumpClock, tmp_path: Path,
                                                 host: str) -> None:
    ca = own(files, now)
    ctx = ca.server_context(host)

    leaf = served_leaf(ctx, host)
    result = openssl_verify(tmp_path, files.cert, leaf)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert f"{tmp_path / 'leaf.pem'}: OK\n" == result.stdout
    client = handshake(ctx, trusting(files.cert), host)
    assert "http/1.1" == client.selected_alpn_protocol()
    assert client.version() in ("TLSv1.2", "TLSv1.3")


def test_the_leaf(files: CAFiles, now: JumpClock) -> None:
    ca = own(files, now)
    ctx = ca.server_context(HOST)

    assert ssl.TLSVersion.TLSv1_2 == ctx.minimum_version
    leaf = served_leaf(ctx, HOST)
    assert [HOST] == extension(leaf, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert not extension(leaf, x509.BasicConstraints).value.ca
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert "secp256r1" == key.curve.name
    at = int(now.time())
    assert at - 300 == leaf.not_valid_before_utc.timestamp()
    assert at + 86400 == leaf.not_valid_after_utc.timestamp()
    assert load(files.cert).subject == leaf.issuer


def test_leaves_are_cached_and_renewed_an_hour_before_expiry(files: CAFiles,
                                                             now: JumpClock) -> None:
    ca = own(files, now)
    first = ca.server_context(HOST)

    assert first is ca.server_context(HOST)
    assert first is ca.server_context("API.Example.com.")   # the same name
    now.advance(22 * 3600)
    assert first is ca.server_context(HOST)
    now.advance(3600 + 1)
    renewed = ca.server_context(HOST)
    assert renewed is not first
    assert renewed is ca.server_context(HOST)
    now.jump_wall(-3600)   # the wall clock went back past the leaf's start
    assert renewed is not ca.server_context(HOST)


def test_the_leaf_cache_is_bounded(files: CAFiles, now: JumpClock,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """"*.example.net" lets a client ask for any number of names."""
    monkeypatch.setattr(ca_module, "MAX_LEAVES", 3)
    ca = own(files, now)
    contexts = [ca.server_context(f"h{i}.example.net") for i in range(4)]

    assert contexts[3] is ca.server_context("h3.example.net")
    assert contexts[1] is ca.server_context("h1.example.net")
    assert contexts[0] is not ca.server_context("h0.example.net")   # the oldest went first


@pytest.mark.parametrize("host", ["other.example.org", "example.net", "a.b.example.net",
                                  "x.api.example.com", "127.0.0.1", "bad host", "a..b", "",
                                  "fe80::1%eth0"])
def test_no_leaf_for_a_name_not_intercepted(files: CAFiles, now: JumpClock, host: str) -> None:
    """Only the configured names, a wildcard one label deep, whatever the constraints
    would let through."""
    ca = own(files, now)
    with pytest.raises(CAError):
        ca.server_context(host)


@pytest.mark.parametrize("entry", ["*.com", "*", "*.*.example.com", "foo*.example.com",
                                   "*.127.0.0.1", "exa mple.com"])
def test_unusable_names_are_refused(files: CAFiles, now: JumpClock, entry: str) -> None:
    with pytest.raises(CAError, match=r"wildcard|not a host name"):
        own(files, now, [entry])
    assert not files.key.exists()


# -- a leaked CA key ------------------------------------------------------------------------------


LEAKED = {
    "another site": ([x509.DNSName("evil.example.org")], "evil.example.org", 47),
    "a name like a permitted one": ([x509.DNSName("api.example.com.evil.org")], None, 47),
    "the parent of a permitted name": ([x509.DNSName("example.com")], None, 47),
    "an IPv4 address": ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], "127.0.0.1", 48),
    "an IPv6 address": ([x509.IPAddress(ipaddress.ip_address("::1"))], "::1", 48),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LEAKED))
def test_a_leaked_key_cannot_sign_for_anything_else(files: CAFiles, now: JumpClock,
                                                   tmp_path: Path, case: str) -> None:
    sans, hostname, code = LEAKED[case]
    own(files, now)
    forged, key = sign(load(files.cert), leaked_key(files), sans=sans)

    result = openssl_verify(tmp_path, files.cert, forged)
    assert 0 != result.returncode
    violation = "permitted" if code == 47 else "excluded"
    assert f"{violation} subtree violation" in result.stderr + result.stdout
    host = hostname or str(sans[0].value)
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        handshake(serving(tmp_path, [forged], key), trusting(files.cert), host)
    assert code == caught.value.verify_code


@pytest.mark.slow
def test_a_leaked_key_cannot_sign_a_name_in_the_common_name_alone(files: CAFiles,
                                                                  now: JumpClock,
                                                                  tmp_path: Path) -> None:
    """OpenSSL checks a host-like CN against the constraints when there is no SAN."""
    own(files, now)
    forged, _ = sign(load(files.cert), leaked_key(files), cn="evil.example.org")

    result = openssl_verify(tmp_path, files.cert, forged)
    assert 0 != result.returncode
    assert "permitted subtree violation" in result.stderr + result.stdout


@pytest.mark.slow
def test_a_leaked_key_cannot_make_an_unconstrained_intermediate(files: CAFiles,
                                                                now: JumpClock,
                                                                tmp_path: Path) -> None:
    own(files, now)
    inter, inter_key = sign(load(files.cert), leaked_key(files), cn="Leaked intermediate",
                            ca=True)
    forged, key = sign(inter, inter_key, sans=[x509.DNSName("evil.example.org")])

    result = openssl_verify(tmp_path, files.cert, forged, untrusted=inter)
    assert 0 != result.returncode
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(serving(tmp_path, [forged, inter], key), trusting(files.cert),
                  "evil.example.org")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x.api.example.com", "example.net", "a.b.example.net"])
def test_what_name_constraints_cannot_express(files: CAFiles, now: JumpClock, tmp_path: Path,
                                              name: str) -> None:
    """RFC 5280: a dNSName subtree holds the name and everything under it. So a leaked key CAN
    sign for names under an intercepted one, and for the base of a wildcard and any depth
    under it; every other domain stays out. The CA itself issues none of them."""
    ca = own(files, now)
    forged, _ = sign(load(files.cert), leaked_key(files), sans=[x509.DNSName(name)])

    result = openssl_verify(tmp_path, files.cert, forged)
    assert 0 == result.returncode, result.stderr
    with pytest.raises(CAError):
        ca.server_context(name)


# -- kept or made again ---------------------------------------------------------------------------


def test_kept_while_the_names_are_the_same(files: CAFiles, now: JumpClock) -> None:
    first = own(files, now)
    inode, serial = files.cert.stat().st_ino, load(files.cert).serial_number
    key_bytes = files.key.read_bytes()

    again = own(files, now, ["*.example.net", "API.example.com", "api.example.com."])
    assert again.created is None
    assert first.cert_pem == again.cert_pem
    assert inode == files.cert.stat().st_ino
    assert serial == load(files.cert).serial_number
    assert key_bytes == files.key.read_bytes()


@pytest.mark.parametrize("names", [[*NAMES, "new.example.com"], ["api.example.com"],
                                   [*NAMES, "10.0.0.1"]],
                         ids=["a name added", "a name dropped", "an ip added"])
def test_made_again_when_the_names_change(files: CAFiles, now: JumpClock,
                                          names: list[str]) -> None:
    own(files, now)
    serial, key_bytes = load(files.cert).serial_number, files.key.read_bytes()

    ca = own(files, now, names)
    assert "the intercepted names changed" == ca.created
    assert serial != load(files.cert).serial_number
    assert key_bytes != files.key.read_bytes()
    assert 0o600 == stat.S_IMODE(files.key.stat().st_mode)
    assert ["ca.key", "ca.pem"] == sorted(p.name for p in files.key.parent.iterdir())
    assert own(files, now, names).created is None


def test_made_again_within_30_days_of_expiry(files: CAFiles, now: JumpClock) -> None:
    own(files, now)
    serial = load(files.cert).serial_number

    now.advance(334 * 86400)
    assert own(files, now).created is None
    now.advance(2 * 86400)
    ca = own(files, now)
    assert ca.created is not None
    assert "within 30 days" in ca.created
    assert serial != load(files.cert).serial_number


def test_made_again_when_its_key_became_readable_by_others(files: CAFiles,
                                                          now: JumpClock) -> None:
    own(files, now)
    files.key.chmod(0o644)

    ca = own(files, now)
    assert ca.created is not None
    assert "readable by others" in ca.created
    assert 0o600 == stat.S_IMODE(files.key.stat().st_mode)


@pytest.mark.parametrize("damage", ["cert", "key", "mismatch", "missing cert"])
def test_made_again_when_damaged(files: CAFiles, now: JumpClock, tmp_path: Path,
                                 damage: str) -> None:
    own(files, now)
    if damage == "cert":
        files.cert.write_bytes(b"not a certificate\n")
    elif damage == "key":
        files.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif damage == "mismatch":   # as a crash between the two renames would leave it
        own(CAFiles(tmp_path / "other.pem", tmp_path / "other.key"), now)
        os.replace(tmp_path / "other.key", files.key)
    else:
        files.cert.unlink()

    ca = own(files, now)
    assert ca.created is not None
    cert = load(files.cert)
    assert cert.public_key() == leaked_key(files).public_key()


def test_its_own_key_is_never_read_or_written_through_a_symlink(files: CAFiles, now: JumpClock,
                                                                tmp_path: Path) -> None:
    own(files, now)
    target = tmp_path / "elsewhere.key"
    target.write_bytes(b"someone else's file\n")
    files.key.unlink()
    files.key.symlink_to(target)

    with pytest.raises(CAError, match=f"{files.key}: is a symbolic link"):
        own(files, now)
    assert b"someone else's file\n" == target.read_bytes()


# -- an operator's CA -----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_operator_ca_is_loaded_and_signs(tmp_path: Path, now: JumpClock) -> None:
    files, cert, _ = operator_ca(tmp_path / "op", use_rsa=True)
    before = (files.cert.read_bytes(), files.key.read_bytes())

    ca = operator(files, now)
    assert ca.created is None
    assert files.cert == ca.path
    assert cert.public_bytes(serialization.Encoding.PEM) == ca.cert_pem
    handshake(ca.server_context(HOST), trusting(files.cert), HOST)
    assert before == (files.cert.read_bytes(), files.key.read_bytes())
    assert ["operator.key", "operator.pem"] == sorted(p.name for p in files.key.parent.iterdir())


def test_an_operator_ca_may_be_a_symlink(tmp_path: Path, now: JumpClock) -> None:
    """As Kubernetes mounts its secrets."""
    real, _, _ = operator_ca(tmp_path / "real")
    files = CAFiles(tmp_path / "ca.pem", tmp_path / "ca.key")
    files.cert.symlink_to(real.cert)
    files.key.symlink_to(real.key)

    operator(files, now).server_context(HOST)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_a_missing_operator_file_is_named(tmp_path: Path, now: JumpClock, which: str) -> None:
    files, _, _ = operator_ca(tmp_path / "op")
    missing = files.cert if which == "cert" else files.key
    missing.unlink()

    with pytest.raises(CAError, match=f"^{missing}: no such file$"):
        operator(files, now)
    assert not missing.exists()   # an operator's files are never made


def test_a_key_that_is_not_the_certificates_is_named(tmp_path: Path, now: JumpClock) -> None:
    files, _, _ = operator_ca(tmp_path / "op")
    other, _, _ = operator_ca(tmp_path / "other")

    with pytest.raises(CAError) as caught:
        operator(CAFiles(files.cert, other.key), now)
    assert str(caught.value) == (f"{other.key}: this key does not belong to the certificate "
                                 f"{files.cert}")


@pytest.mark.parametrize("problem", ["garbage cert", "garbage key", "encrypted key", "not a CA",
                                     "expired", "unreadable", "a directory"])
def test_an_unusable_operator_ca_is_refused(tmp_path: Path, now: JumpClock,
                                            problem: str) -> None:
    files, _, key = operator_ca(tmp_path / "op", ca=problem != "not a CA")
    named, message = {
        "garbage cert": (files.cert, "not a PEM certificate"),
        "garbage key": (files.key, "not a PEM private key"),
        "encrypted key": (files.key, "encrypted"),
        "not a CA": (files.cert, "not a CA certificate"),
        "expired": (files.cert, "expired on"),
        "unreadable": (files.key, "cannot be read"),
        "a directory": (files.cert, "not a regular file"),
    }[problem]
    if problem == "garbage cert":
        files.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    elif problem == "garbage key":
        files.key.write_bytes(b"hello\n")
    elif problem == "encrypted key":
        files.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
    elif problem == "expired":
        now.advance(31 * 86400)
    elif problem == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a file whatever its mode")
        files.key.chmod(0)
    elif problem == "a directory":
        files.cert.unlink()
        files.cert.mkdir()

    with pytest.raises(CAError, match=f"^{named}: .*{message}"):
        operator(files, now)


def test_an_operator_cas_own_constraints_must_permit_every_name(tmp_path: Path,
                                                                now: JumpClock) -> None:
    """Constraints are optional on an operator's CA; when present they must allow every
    intercepted name, and the error says which they do not."""
    permits = x509.NameConstraints(
        [x509.DNSName("example.com"), x509.DNSName("example.net")],
        [x509.DNSName("secret.example.net")])
    files, _, _ = operator_ca(tmp_path / "op", constraints=permits)

    operator(files, now, ["api.example.com", "*.example.com", "a.example.net"])
    with pytest.raises(CAError, match=f"^{files.cert}: .* do not permit other.example.org$"):
        operator(files, now, ["api.example.com", "other.example.org"])
    with pytest.raises(CAError, match=r"do not permit \*\.example\.net$"):
        operator(files, now, ["*.example.net"])   # secret.example.net is one of them
    with pytest.raises(CAError, match=r"do not permit secret\.example\.net$"):
        operator(files, now, ["secret.example.net"])
    with pytest.raises(CAError, match=r"do not permit \*\.org$|wildcard"):
        operator(files, now, ["*.org"])


# -- key material stays put -----------------------------------------------------------------------


def _key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("-----")]


def test_no_key_material_in_logs_reprs_or_errors(files: CAFiles, now: JumpClock,
                                                 logs: CapturedLogs, tmp_path: Path) -> None:
    ca = own(files, now)
    ca.server_context(HOST)
    errors = []
    for attempt in (lambda: ca.server_context("other.example.org"),
                    lambda: operator(CAFiles(files.cert, files.key), now, ["other.example.org"]),
                    lambda: operator(CAFiles(tmp_path / "none.pem", files.key), now)):
        with pytest.raises(CAError) as caught:
            attempt()
        errors.append(str(caught.value))
    leaked = [line for line in _key_lines(files.key)
              if line in logs.text or line in repr(ca) or any(line in e for e in errors)]

    assert [] == leaked
    assert "ca.key" not in repr(ca)


@pytest.mark.slow
def test_the_module_does_not_log() -> None:
    """Its caller logs ``created``; a module holding keys has no logger to misuse."""
    tree = ast.parse(Path(ca_module.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert set() == {m for m in imported if "log" in m.split(".")[-1] or m == "structlog"}


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "temporary directory"])
def test_leaf_keys_are_left_nowhere(files: CAFiles, now: JumpClock, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, memfd: bool) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    made: list[str] = []
    if memfd:
        real = os.memfd_create
        monkeypatch.setattr(os, "memfd_create",
                            lambda name, flags=0: made.append(name) or real(name, flags))
    else:
        monkeypatch.delattr(os, "memfd_create")
    ca = own(files, now)

    ctx = ca.server_context(HOST)
    handshake(ctx, trusting(files.cert), HOST)
    assert (["tokenproxy-leaf"] if memfd else []) == made
    assert [] == list(scratch.iterdir())
    assert ["ca.key", "ca.pem"] == sorted(p.name for p in files.key.parent.iterdir())
    fds = os.listdir("/proc/self/fd")
    assert [] == [fd for fd in fds if "memfd:tokenproxy" in _link(f"/proc/self/fd/{fd}")]


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
