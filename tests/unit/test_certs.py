"""The private CA: what it writes, what a TLS handshake makes of it, and how it refuses."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import re
import socket
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fault import tmpfs
from vmreplica._internal import certs
from vmreplica.errors import AccessDenied, InvalidArgument, NotFound, StorageError

SERVER = "replica.example"
CLIENT = "primary.example"
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    ca: certs.CaFiles
    server: certs.IssuedFiles
    client: certs.IssuedFiles


def _make_pki(root: Path) -> Pki:
    ca = certs.new_ca(root / "ca")
    server = certs.issue(root / "ca", [SERVER, "localhost"], root / "server")
    client = certs.issue(root / "ca", [CLIENT], root / "client")
    return Pki(ca, server, client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Same names, different CA: what an attacker with a CA of their own could present."""
    return _make_pki(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Pki:
    root = tmp_path_factory.mktemp("expired")
    now = dt.datetime.now(dt.UTC)
    start, end = now - 30 * DAY, now - DAY
    ca_dir = pki.ca.cert.parent
    server = certs.issue(ca_dir, [SERVER], root / "server", not_before=start, not_after=end)
    client = certs.issue(ca_dir, [CLIENT], root / "client", not_before=start, not_after=end)
    return Pki(pki.ca, server, client)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- what gets written ------------------------------------------------------------------


def test_issued_certificate_contents(pki: Pki) -> None:
    cert = _load(pki.server.cert)
    ca_cert = _load(pki.ca.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SERVER

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [SERVER, "localhost"]
    assert not san.critical
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False

    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=10) < cert.not_valid_before_utc <= now
    assert abs(cert.not_valid_after_utc - (now + 365 * DAY)) < dt.timedelta(minutes=2)


def test_issued_files_modes_key_and_ca_copy(pki: Pki) -> None:
    out = pki.server.cert.parent
    assert _tree(out) == ["ca.pem", "cert.pem", "key.pem"]  # no temporaries left over
    assert _mode(pki.server.key) == 0o600
    assert _mode(pki.server.cert) == 0o644
    assert _mode(out) == 0o700
    assert pki.server.ca.read_bytes() == pki.ca.cert.read_bytes()
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == _load(pki.server.cert).public_key()


def test_new_ca_contents_and_modes(pki: Pki) -> None:
    ca_cert = _load(pki.ca.cert)
    ca_cert.verify_directly_issued_by(ca_cert)  # self-signed
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vmreplica CA"
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    lifetime = ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc
    assert 3650 * DAY <= lifetime <= 3650 * DAY + dt.timedelta(minutes=10)
    assert _mode(pki.ca.key) == 0o600
    assert _mode(pki.ca.cert.parent) == 0o700


def test_new_ca_refuses_to_replace_key_unless_forced(tmp_path: Path) -> None:
    ca = certs.new_ca(tmp_path / "ca")
    before = ca.key.read_bytes()
    with pytest.raises(InvalidArgument, match=r"ca\.key"):
        certs.new_ca(tmp_path / "ca")
    assert ca.key.read_bytes() == before
    certs.new_ca(tmp_path / "ca", common_name="replacement", force=True)
    assert ca.key.read_bytes() != before
    name = _load(ca.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == "replacement"


def test_names_are_lowercased_and_deduplicated(pki: Pki, tmp_path: Path) -> None:
    out = certs.issue(pki.ca.cert.parent, ["Host.Example", "host.example", "b"], tmp_path / "o")
    assert certs.cert_dns_names(out.cert) == ["host.example", "b"]


def test_name_too_long_for_common_name_goes_only_in_critical_san(pki: Pki, tmp_path: Path) -> None:
    long_name = ".".join(["a" * 63, "b" * 63, "example"])
    out = certs.issue(pki.ca.cert.parent, [long_name], tmp_path / "o")
    cert = _load(out.cert)
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert certs.cert_dns_names(out.cert) == [long_name]


def test_cert_dns_names_and_thumbprint(pki: Pki) -> None:
    assert certs.cert_dns_names(pki.client.cert) == [CLIENT]
    assert certs.cert_dns_names(pki.ca.cert) == []  # the CA names no host
    der = _load(pki.server.cert).public_bytes(serialization.Encoding.DER)
    thumb = certs.cert_thumbprint(pki.server.cert)
    assert thumb == hashlib.sha1(der).hexdigest().upper()
    assert len(thumb) == 40 and thumb == thumb.upper()
    assert certs.cert_thumbprint(pki.client.cert) != thumb


def test_helpers_report_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"nope\.pem"):
        certs.cert_thumbprint(tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(InvalidArgument, match=r"junk\.pem"):
        certs.cert_dns_names(tmp_path / "junk.pem")


def test_peer_dns_names_reads_getpeercert_format() -> None:
    peercert: dict[str, object] = {
        "subject": ((("commonName", "a.example"),),),
        "subjectAltName": (("DNS", "a.example"), ("IP Address", "10.0.0.1"), ("DNS", "b")),
    }
    assert certs.peer_dns_names(peercert) == ["a.example", "b"]
    assert certs.peer_dns_names({}) == []
    assert certs.peer_dns_names(None) == []
    assert certs.peer_dns_names({"subjectAltName": "garbage"}) == []


# --- TLS ------------------------------------------------------------------------------


@dataclass
class Outcome:
    server_error: OSError | None = None
    client_error: OSError | None = None
    client_names_seen_by_server: list[str] = field(default_factory=list)
    reply: bytes = b""


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = SERVER
) -> Outcome:
    """Both ends over a connected socket pair; the server answers once it has verified us."""
    out = Outcome()
    server_sock, client_sock = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.settimeout(10)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                out.client_names_seen_by_server = certs.peer_dns_names(tls.getpeercert())
                tls.sendall(b"hello")
        except OSError as e:  # ssl.SSLError included
            out.server_error = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=hostname) as tls:
            # With TLS 1.3 the server judges our certificate after our side has finished
            # the handshake, so its refusal surfaces on the first read.
            out.reply = tls.recv(5)
    except OSError as e:
        out.client_error = e
    finally:
        thread.join(15)
        server_sock.close()
        client_sock.close()
    assert not thread.is_alive()
    return out


def _server(ca: Path, files: certs.IssuedFiles) -> ssl.SSLContext:
    return certs.server_ssl_context(ca, files.cert, files.key)


def _client(ca: Path, files: certs.IssuedFiles) -> ssl.SSLContext:
    return certs.client_ssl_context(ca, files.cert, files.key)


def test_context_settings(pki: Pki) -> None:
    server = _server(pki.ca.cert, pki.server)
    client = _client(pki.ca.cert, pki.client)
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2


def test_mutual_tls_between_hosts_of_one_ca(pki: Pki) -> None:
    out = _handshake(_server(pki.ca.cert, pki.server), _client(pki.ca.cert, pki.client))
    assert out.server_error is None and out.client_error is None
    assert out.reply == b"hello"
    assert out.client_names_seen_by_server == [CLIENT]


def test_any_san_is_a_valid_hostname(pki: Pki) -> None:
    out = _handshake(
        _server(pki.ca.cert, pki.server), _client(pki.ca.cert, pki.client), "localhost"
    )
    assert out.reply == b"hello"


def test_certificates_pass_x509_strict_verification(pki: Pki) -> None:
    """Python 3.13 verifies with VERIFY_X509_STRICT by default; our certificates must pass."""
    server = _server(pki.ca.cert, pki.server)
    client = _client(pki.ca.cert, pki.client)
    for ctx in (server, client):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    out = _handshake(server, client)
    assert out.server_error is None and out.client_error is None
    assert out.reply == b"hello"


def test_server_rejects_client_cert_from_another_ca(pki: Pki, foreign: Pki) -> None:
    out = _handshake(_server(pki.ca.cert, pki.server), _client(pki.ca.cert, foreign.client))
    assert isinstance(out.server_error, ssl.SSLCertVerificationError)
    assert out.client_error is not None
    assert out.reply == b""


def test_server_rejects_client_without_cert(pki: Pki) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=pki.ca.cert)
    out = _handshake(_server(pki.ca.cert, pki.server), bare)
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.reply == b""


def test_client_rejects_server_cert_from_another_ca(pki: Pki, foreign: Pki) -> None:
    out = _handshake(_server(pki.ca.cert, foreign.server), _client(pki.ca.cert, pki.client))
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert out.server_error is not None
    assert out.client_names_seen_by_server == []


def test_client_rejects_hostname_mismatch(pki: Pki) -> None:
    client = _client(pki.ca.cert, pki.client)
    out = _handshake(_server(pki.ca.cert, pki.server), client, hostname="other.example")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in str(out.client_error).lower()
    assert out.reply == b""


def test_expired_server_cert_rejected(pki: Pki, expired: Pki) -> None:
    out = _handshake(_server(pki.ca.cert, expired.server), _client(pki.ca.cert, pki.client))
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert "expired" in out.client_error.verify_message
    assert out.reply == b""


def test_expired_client_cert_rejected(pki: Pki, expired: Pki) -> None:
    out = _handshake(_server(pki.ca.cert, pki.server), _client(pki.ca.cert, expired.client))
    assert isinstance(out.server_error, ssl.SSLCertVerificationError)
    assert "expired" in out.server_error.verify_message
    assert out.reply == b""


def test_expired_certificate_validity_is_as_requested(expired: Pki) -> None:
    cert = _load(expired.server.cert)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=29)


def test_context_loading_errors_name_the_file(pki: Pki, foreign: Pki, tmp_path: Path) -> None:
    s = pki.server
    with pytest.raises(NotFound, match=r"missing-ca\.pem"):
        certs.server_ssl_context(tmp_path / "missing-ca.pem", s.cert, s.key)
    with pytest.raises(NotFound, match=r"missing-key\.pem"):
        certs.client_ssl_context(s.ca, s.cert, tmp_path / "missing-key.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("garbage\n")
    with pytest.raises(InvalidArgument, match=r"junk\.pem"):
        certs.server_ssl_context(junk, s.cert, s.key)
    with pytest.raises(InvalidArgument, match=r"junk\.pem"):
        certs.client_ssl_context(s.ca, junk, s.key)
    with pytest.raises(InvalidArgument, match="do not match"):
        certs.client_ssl_context(s.ca, s.cert, foreign.server.key)
    with pytest.raises(StorageError, match="cannot read"):
        certs.server_ssl_context(tmp_path, s.cert, s.key)  # a directory, not a file


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "at least one"),
        ([""], "empty"),
        (["  "], "empty"),
        (["ok.example", ""], "empty"),
        (["*.example.com"], "not a valid DNS name"),
        (["under_score.example"], "not a valid DNS name"),
        (["-lead.example"], "not a valid DNS name"),
        (["trail-.example"], "not a valid DNS name"),
        (["double..dot"], "not a valid DNS name"),
        (["host.example."], "not a valid DNS name"),
        (["a" * 64 + ".example"], "not a valid DNS name"),
        ([".".join(["a" * 63] * 4)], "not a valid DNS name"),  # 255 characters
        (["hôst.example"], "not a valid DNS name"),
        (["10.0.0.1"], "IP address"),
        (["::1"], "not a valid DNS name"),
    ],
)
def test_bad_names_rejected_without_writing(
    pki: Pki, tmp_path: Path, names: list[str], message: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidArgument, match=message):
        certs.issue(pki.ca.cert.parent, names, out)
    assert not out.exists()


def test_a_bare_string_is_not_a_list_of_names(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        certs.issue(pki.ca.cert.parent, "host.example", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_single_label_names_are_allowed(pki: Pki, tmp_path: Path) -> None:
    out = certs.issue(pki.ca.cert.parent, ["localhost", "replica-01"], tmp_path / "o")
    assert certs.cert_dns_names(out.cert) == ["localhost", "replica-01"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"days": 0},
        {"not_before": dt.datetime.now(dt.UTC), "not_after": dt.datetime.now(dt.UTC) - DAY},
    ],
)
def test_bad_validity_rejected(pki: Pki, tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        certs.issue(pki.ca.cert.parent, [SERVER], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("common_name", "days"), [("", 10), ("x" * 65, 10), ("ok", 0)])
def test_bad_ca_parameters_rejected(tmp_path: Path, common_name: str, days: int) -> None:
    with pytest.raises(InvalidArgument):
        certs.new_ca(tmp_path / "ca", common_name=common_name, days=days)
    assert _tree(tmp_path) == []


def test_missing_ca_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"CA not found: .*nowhere.*vmreplica cert new-ca") as e:
        certs.issue(tmp_path / "nowhere", [SERVER], tmp_path / "out")
    assert "\n" not in str(e.value)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("missing", ["ca.pem", "ca.key"])
def test_missing_ca_file(pki: Pki, tmp_path: Path, missing: str) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for name in {"ca.pem", "ca.key"} - {missing}:
        (ca_dir / name).write_bytes((pki.ca.cert.parent / name).read_bytes())
    with pytest.raises(NotFound, match=rf"not found: .*{re.escape(missing)}.*new-ca"):
        certs.issue(ca_dir, [SERVER], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _ca_dir_with(tmp_path: Path, cert: bytes, key: bytes) -> Path:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(cert)
    (ca_dir / "ca.key").write_bytes(key)
    return ca_dir


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("corrupt-cert", r"ca\.pem is not a PEM certificate"),
        ("corrupt-key", r"ca\.key is not an unencrypted PEM private key"),
        ("mismatched-key", "is not the private key of"),
        ("leaf-as-ca", "is not a CA certificate"),
    ],
)
def test_unusable_ca_rejected(
    pki: Pki, foreign: Pki, tmp_path: Path, which: str, message: str
) -> None:
    good_cert, good_key = pki.ca.cert.read_bytes(), pki.ca.key.read_bytes()
    files = {
        "corrupt-cert": (b"-----BEGIN CERTIFICATE-----\nAAAA\n", good_key),
        "corrupt-key": (good_cert, b"garbage"),
        "mismatched-key": (good_cert, foreign.ca.key.read_bytes()),
        "leaf-as-ca": (pki.server.cert.read_bytes(), pki.server.key.read_bytes()),
    }[which]
    ca_dir = _ca_dir_with(tmp_path, *files)
    with pytest.raises(InvalidArgument, match=message):
        certs.issue(ca_dir, [SERVER], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_ca_file(pki: Pki, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    (ca_dir / "ca.pem").mkdir(parents=True)  # reading it fails with EISDIR
    (ca_dir / "ca.key").write_bytes(pki.ca.key.read_bytes())
    with pytest.raises(StorageError, match=r"cannot read .*ca\.pem"):
        certs.issue(ca_dir, [SERVER], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_path_is_a_file(pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(StorageError, match=re.escape(f"cannot write {target}: not a directory")):
        certs.issue(pki.ca.cert.parent, [SERVER], target)
    with pytest.raises(StorageError, match=re.escape(f"cannot write {target}")):
        certs.new_ca(target / "ca")
    assert target.read_text() == "keep me"
    assert _tree(tmp_path) == ["file"]


def test_output_directory_not_writable(pki: Pki, tmp_path: Path) -> None:
    # A read-only file system refuses even root, unlike directory permissions.
    with tmpfs(tmp_path / "locked", read_only=True) as locked:
        with pytest.raises(StorageError, match=r"cannot write .*locked.*[Rr]ead-only"):
            certs.issue(pki.ca.cert.parent, [SERVER], locked)
        assert _tree(locked) == []


@pytest.mark.parametrize(
    "failure",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only")],
)
def test_failed_write_leaves_nothing_behind(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    """The second temporary fails: the first must go, and so must the directory we made."""
    real_mkstemp = tempfile.mkstemp
    calls: list[str] = []

    def flaky_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        calls.append(kwargs.get("prefix", ""))
        if len(calls) == 2:
            raise failure
        fd, name = real_mkstemp(*args, **kwargs)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", flaky_mkstemp)
    out = tmp_path / "new" / "host"
    with pytest.raises(
        StorageError, match=re.escape(f"cannot write {out / 'key.pem'}: {failure.strerror}")
    ):
        certs.issue(pki.ca.cert.parent, [SERVER], out)
    assert len(calls) == 2
    assert _tree(tmp_path) == []


def test_failed_reissue_keeps_previous_files(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = certs.issue(pki.ca.cert.parent, [SERVER], tmp_path / "host")
    before = {p.name: p.read_bytes() for p in (first.cert, first.key, first.ca)}
    real_mkstemp = tempfile.mkstemp

    def failing_last(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if str(kwargs.get("prefix", "")).startswith(".ca.pem"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fd, name = real_mkstemp(*args, **kwargs)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", failing_last)
    with pytest.raises(StorageError, match="No space left"):
        certs.issue(pki.ca.cert.parent, ["other.example"], tmp_path / "host")
    assert {p.name: p.read_bytes() for p in (first.cert, first.key, first.ca)} == before
    assert _tree(tmp_path / "host") == ["ca.pem", "cert.pem", "key.pem"]


def test_subject_identity_is_rfc4514_and_refuses_an_empty_subject(tmp_path: Path) -> None:
    certs.new_ca(tmp_path / "ca")
    short = certs.issue(tmp_path / "ca", [CLIENT], tmp_path / "short")
    der = x509.load_pem_x509_certificate(short.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert certs.subject_identity(der) == f"CN={CLIENT}"
    long_name = ".".join(["a" * 30] * 3) + ".example"  # over 64 characters: no commonName
    long = certs.issue(tmp_path / "ca", [long_name], tmp_path / "long")
    der = x509.load_pem_x509_certificate(long.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    with pytest.raises(AccessDenied, match="empty subject"):
        certs.subject_identity(der)


def test_a_revoked_client_is_refused_once_the_crl_is_loaded(tmp_path: Path) -> None:
    pki = _make_pki(tmp_path)
    ca_dir = pki.ca.cert.parent
    crl, count = certs.write_crl(ca_dir)
    assert count == 0 and crl == ca_dir / "crl.pem"
    server = certs.server_ssl_context(pki.ca.cert, pki.server.cert, pki.server.key, crl)
    ok = _handshake(server, _client(pki.ca.cert, pki.client))
    assert ok.reply == b"hello"
    crl, count = certs.write_crl(ca_dir, [pki.client.cert])
    assert count == 1 and certs.load_crl(server, crl) == 1  # a reload into the live context
    out = _handshake(server, _client(pki.ca.cert, pki.client))
    assert out.server_error is not None and "revoked" in str(out.server_error)
    again, count = certs.write_crl(ca_dir)  # re-signed: the revocation stays
    assert count == 1
    number = x509.load_pem_x509_crl(again.read_bytes()).extensions.get_extension_for_class(
        x509.CRLNumber
    )
    assert number.value.crl_number == 3


def test_crl_refusals(tmp_path: Path, foreign: Pki) -> None:
    pki = _make_pki(tmp_path)
    ca_dir = pki.ca.cert.parent
    with pytest.raises(InvalidArgument, match="was not issued by the CA"):
        certs.write_crl(ca_dir, [foreign.client.cert])
    assert not (ca_dir / "crl.pem").exists()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a CRL")
    ctx = _server(pki.ca.cert, pki.server)
    with pytest.raises(InvalidArgument, match="is not a PEM certificate revocation list"):
        certs.load_crl(ctx, junk)
    with pytest.raises(NotFound, match="CRL not found"):
        certs.load_crl(ctx, tmp_path / "missing.pem")


def test_tls_refusal_reasons(tmp_path: Path, pki: Pki, expired: Pki, foreign: Pki) -> None:
    from vmreplica._internal import tls_refusals as r

    alert = "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired"
    assert str(r.own_certificate_refused(alert, expired.client.cert, "h1")).startswith(
        "expired certificate: h1 refused the certificate"
    )
    assert r.own_certificate_refused(alert, pki.client.cert, "h1") is None  # dates are fine
    revoked = "sslv3 alert certificate revoked"
    assert str(r.own_certificate_refused(revoked, pki.client.cert, "h1")).startswith(
        "revoked certificate:"
    )
    assert r.own_certificate_refused("unknown ca", pki.client.cert, "h1") is None
    # Refused, and issued by a CA this host does not have in its own CA file: named so.
    unknown = "sslv3 alert unknown ca"
    assert r.own_certificate_refused(unknown, pki.client.cert, "h1", ca=pki.ca.cert) is None
    other = str(r.own_certificate_refused(unknown, foreign.client.cert, "h1", ca=pki.ca.cert))
    assert other.startswith(f"certificate of another CA: h1 refused the certificate "
                            f"{foreign.client.cert}: it is not issued by the CA of")  # fmt: skip
    bundle = tmp_path / "both.pem"  # a CA rotation: both trusted
    bundle.write_bytes(foreign.ca.cert.read_bytes() + pki.ca.cert.read_bytes())
    assert r.own_certificate_refused(unknown, pki.client.cert, "h1", ca=bundle) is None
    assert r.own_certificate_refused(unknown, pki.ca.cert, "h1").startswith(  # type: ignore[union-attr]
        "wrong-usage certificate: h1 refused the certificate"
    )
    for message, reason in (
        ("certificate has expired", "expired certificate"),
        ("certificate is not yet valid", "certificate not yet valid"),
        ("certificate revoked", "revoked certificate"),
        ("unable to get local issuer certificate", "untrusted certificate"),
        ("unsuitable certificate purpose", "wrong-usage certificate"),
        ("hostname mismatch", None),
    ):
        got = r.peer_certificate_refused(message, "h1")
        assert (got.split(":")[0] if got else None) == reason
