"""A private CA for mutual TLS between partners, so no enterprise PKI is needed.

Hosts trust only this CA, so a public certificate never grants access. A host is primary for
some VMs and replica for others, so its certificate serves both ends of a connection.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID

# What moved to tls_context.py (no `cryptography` there) is still reachable from here.
from vmreplica._internal.tls_context import PathArg as PathArg
from vmreplica._internal.tls_context import _read
from vmreplica._internal.tls_context import check_dns_name as check_dns_name
from vmreplica._internal.tls_context import client_ssl_context as client_ssl_context
from vmreplica._internal.tls_context import etcd_client_ssl_context as etcd_client_ssl_context
from vmreplica._internal.tls_context import load_crl as load_crl
from vmreplica._internal.tls_context import peer_dns_names as peer_dns_names
from vmreplica._internal.tls_context import server_ssl_context as server_ssl_context
from vmreplica.errors import AccessDenied, InvalidArgument, NotFound, StorageError

_Signer = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PubKey = ec.EllipticCurvePublicKey
_Span = tuple[dt.datetime, dt.datetime]
_Exts = Sequence[tuple[x509.ExtensionType, bool]]

_CA_HINT = " (create one with `vmreplica cert new-ca --out DIR`)"
_CLOCK_SKEW = dt.timedelta(minutes=5)  # partners whose clocks run a little behind still accept
_CN_MAX = 64  # X.520 upper bound on commonName
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    ca: Path


def new_ca(
    out_dir: PathArg, common_name: str = "vmreplica CA", days: int = 3650, *, force: bool = False
) -> CaFiles:
    """Create the CA. Replacing its key would orphan every issued certificate, hence ``force``."""
    out = Path(out_dir)
    if not common_name.strip() or len(common_name) > _CN_MAX:
        raise InvalidArgument(f"CA common name must be 1 to {_CN_MAX} characters")
    lifetime = _days(days)
    if (out / "ca.key").exists() and not force:
        raise InvalidArgument(
            f"{out / 'ca.key'} exists; replacing it orphans issued certs (--force)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    exts = [(x509.BasicConstraints(ca=True, path_length=0), True), (_key_usage(ca=True), True)]
    cert = _sign(name, key.public_key(), name, key, (now - _CLOCK_SKEW, now + lifetime), exts)
    _write_all(out, [("ca.pem", _pem(cert), 0o644), ("ca.key", _pem(key), 0o600)])
    return CaFiles(cert=out / "ca.pem", key=out / "ca.key")


def issue(
    ca_dir: PathArg,
    names: Sequence[str],
    out_dir: PathArg,
    days: int = 365,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedFiles:
    """Host certificate; all input is checked before anything is written. The validity
    overrides exist so tests can forge expired certificates (naive datetimes: local time)."""
    out = Path(out_dir)
    dns = _check_names(names)
    now = dt.datetime.now(dt.UTC)
    lifetime = _days(days)
    start = now - _CLOCK_SKEW if not_before is None else not_before.astimezone(dt.UTC)
    end = now + lifetime if not_after is None else not_after.astimezone(dt.UTC)
    if end <= start:
        raise InvalidArgument(f"certificate would expire ({end}) before it is valid ({start})")
    ca_cert, ca_key, ca_pem = _load_ca(Path(ca_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    # A name too long for a commonName: empty subject and, as RFC 5280 wants, a critical SAN.
    cn = [x509.NameAttribute(NameOID.COMMON_NAME, dns[0])] if len(dns[0]) <= _CN_MAX else []
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), False),
        (x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), not cn),
    ]
    cert = _sign(x509.Name(cn), key.public_key(), ca_cert.subject, ca_key, (start, end), exts)
    files = [("cert.pem", _pem(cert), 0o644), ("key.pem", _pem(key), 0o600)]
    _write_all(out, [*files, ("ca.pem", ca_pem, 0o644)])
    return IssuedFiles(cert=out / "cert.pem", key=out / "key.pem", ca=out / "ca.pem")


def cert_dns_names(cert_pem_path: PathArg) -> list[str]:
    """The DNS SANs: the names partners must dial, and the names they authorize."""
    cert = _read_cert(Path(cert_pem_path), "certificate")[0]
    sans = [e.value for e in cert.extensions if isinstance(e.value, x509.SubjectAlternativeName)]
    return sans[0].get_values_for_type(x509.DNSName) if sans else []


def cert_thumbprint(cert_pem_path: PathArg) -> str:
    """SHA-1 of the DER in upper-case hex, as Hyper-V shows operators (CertificateThumbprint)."""
    cert = _read_cert(Path(cert_pem_path), "certificate")[0]
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def subject_identity(cert_der: bytes) -> str:
    """A certificate's subject as RFC 4514 text: what QEMU's ``authz-simple`` compares (GnuTLS
    prints distinguished names in that order too). An empty subject (a name too long for a
    commonName) would match every other empty subject from the same CA, so it is refused."""
    subject = x509.load_der_x509_certificate(cert_der).subject.rfc4514_string()
    if not subject:
        raise AccessDenied(
            "the peer certificate has an empty subject, which cannot be told apart from others "
            f"for the initial copy: issue it for a name of at most {_CN_MAX} characters"
        )
    return subject


def write_crl(ca_dir: PathArg, revoke: Sequence[PathArg] = ()) -> tuple[Path, int]:
    """The CA's CRL, ``crl.pem`` in its directory: what it revoked before, plus ``revoke``.

    It is valid until the CA expires: a CRL past its next update would make OpenSSL refuse every
    certificate of the CA, and this one is re-signed whenever a certificate is revoked."""
    ca_path = Path(ca_dir)
    ca_cert, ca_key, _ = _load_ca(ca_path)
    now = dt.datetime.now(dt.UTC)
    revoked: dict[int, dt.datetime] = {}
    number = 0
    # OpenSSL keeps every CRL a live context was given and trusts the one updated last, so
    # each new CRL must be later than the one before, even within the same second.
    last_update = now - _CLOCK_SKEW
    if (ca_path / "crl.pem").exists():
        old = x509.load_pem_x509_crl(_read(ca_path / "crl.pem", "CRL"))
        if not old.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            raise InvalidArgument(f"{ca_path / 'crl.pem'} is not signed by this CA")
        revoked = {r.serial_number: r.revocation_date_utc for r in old}
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        last_update = max(last_update, old.last_update_utc + dt.timedelta(seconds=1))
    for path in revoke:
        cert, _ = _read_cert(Path(path), "certificate")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidArgument(f"{path} was not issued by the CA in {ca_path}") from None
        revoked.setdefault(cert.serial_number, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_all(ca_path, [("crl.pem", crl.public_bytes(serialization.Encoding.PEM), 0o644)])
    return ca_path / "crl.pem", len(revoked)


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names:
        raise InvalidArgument("a certificate needs at least one DNS name")
    return list(dict.fromkeys(check_dns_name(raw) for raw in names))


def _days(days: int) -> dt.timedelta:
    if days < 1:
        raise InvalidArgument(f"validity must be at least 1 day, not {days}")
    return dt.timedelta(days=days)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, _Signer, bytes]:
    """Refuse a CA that could only sign certificates no partner would accept."""
    if not ca_dir.exists():
        raise NotFound(f"CA not found: {ca_dir}{_CA_HINT}")
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    cert, pem = _read_cert(cert_path, "CA", _CA_HINT)
    key_data = _read(key_path, "CA key", _CA_HINT)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InvalidArgument(f"{key_path} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidArgument(f"{key_path} holds a {type(key).__name__}; expected EC or RSA")
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise InvalidArgument(f"{key_path} is not the private key of {cert_path}")
    if not any(isinstance(e.value, x509.BasicConstraints) and e.value.ca for e in cert.extensions):
        raise InvalidArgument(f"{cert_path} is not a CA certificate")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise InvalidArgument(f"CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key, pem


def _read_cert(path: Path, what: str, hint: str = "") -> tuple[x509.Certificate, bytes]:
    data = _read(path, what, hint)
    try:
        return x509.load_pem_x509_certificate(data), data
    except ValueError as e:
        raise InvalidArgument(f"{path} is not a PEM certificate") from e


def _sign(
    subject: x509.Name, key: _PubKey, issuer: x509.Name, signer: _Signer, span: _Span, exts: _Exts
) -> x509.Certificate:
    """Key identifiers go on every certificate: X509_STRICT (Python 3.13's default) needs them."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(span[0])
        .not_valid_after(span[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    for ext, critical in exts:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Host keys are EC (ECDHE), so they only sign; keyEncipherment would be meaningless."""
    # digital_signature, content_commitment, key_encipherment, data_encipherment,
    # key_agreement, key_cert_sign, crl_sign, encipher_only, decipher_only
    return x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False)


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    fmt = serialization.PrivateFormat.PKCS8
    return obj.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write_all(out_dir: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Temporaries first, renames last, so no certificate is ever left without its key."""
    if out_dir.exists() and not out_dir.is_dir():
        raise StorageError(f"cannot write {out_dir}: not a directory")
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    temps: list[str] = []
    target = out_dir
    try:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)  # it will hold a private key
        for name, data, mode in files:
            target = out_dir / name
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, (name, _, _) in zip(temps, files, strict=True):
            target = out_dir / name
            os.replace(tmp, target)
    except OSError as e:
        for tmp in temps:
            with suppress(OSError):
                os.unlink(tmp)
        for d in created:
            with suppress(OSError):
                d.rmdir()
        raise StorageError(f"cannot write {target}: {e.strerror or e}") from e
    with suppress(OSError):  # makes the renames durable; the files are complete regardless
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
