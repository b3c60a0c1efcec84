"""Certificates of another CA, or issued for the wrong use, against real agents on both TLS
listeners (the replication listener and the management API): each refused in one line that
names the reason; and a CA rotation (the new CA trusted beside the old one, then alone)."""

from __future__ import annotations

import datetime as dt
import shutil
import tomllib
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID

from tests.integration.test_certificates import _test_connection
from tests.integration.test_server_auth import one_line_error
from tests.localcluster import ADMIN, Cluster
from vmreplica._internal import certs

REPLICA, PRIMARY, OTHER = "vmhost1", "vmhost2", "vmhost3"


def forge(
    ca_dir: Path, name: str, out: Path, usages: list[x509.ObjectIdentifier], *, san: bool = True
) -> None:
    """A host certificate of the CA in ``ca_dir`` whose extended key usage is ``usages`` (and,
    unless ``san`` is false, with ``name`` as its DNS name; else only as its common name)."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_pub = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.KeyUsage(True, *[False] * 8), True)
        .add_extension(x509.ExtendedKeyUsage(usages), False)
        .add_extension(ski, False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_pub), False)
    )
    if san:
        cert = cert.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
    signed = cert.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    shutil.copy(ca_dir / "ca.pem", out / "ca.pem")


def _admin_cli(cluster: Cluster, admin: Path) -> Path:
    """A CLI config like the cluster's, with another administrator certificate."""
    data = tomllib.loads(cluster.cli_config.read_text())
    for entry in data["hosts"].values():
        entry["cert"], entry["key"] = str(admin / "cert.pem"), str(admin / "key.pem")
    path = admin / "cli.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _use(tls: Path, source: Path, *names: str) -> None:
    for name in names or ("cert.pem", "key.pem"):
        (tls / name).write_bytes((source / name).read_bytes())


def _restart(cluster: Cluster, host: str) -> None:
    cluster.stop(host)
    cluster.start(host)


def _server_get(cluster: Cluster, admin: Path) -> tuple[int, str]:
    real = cluster.cli_config
    try:
        cluster.cli_config = _admin_cli(cluster, admin)
        done = cluster.cli("server", "get", "-c", REPLICA, check=False)
    finally:
        cluster.cli_config = real
    return done.returncode, one_line_error(done.stderr) if done.returncode else ""


def test_another_cas_or_a_wrong_usage_certificate_is_refused_naming_why(cluster: Cluster) -> None:
    port = cluster.hosts[REPLICA].replica_port
    peer = f"{REPLICA}:{port}"
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=REPLICA)  # fmt: skip
    cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
                str(cluster.base / "r"), "--trust-group", "Production", host=REPLICA)  # fmt: skip
    assert _test_connection(cluster, PRIMARY) == (0, "")
    tls, rtls = (cluster.hosts[h].dir / "tls" for h in (PRIMARY, REPLICA))
    good, rgood = cluster.base / "good", cluster.base / "rgood"
    for src, dst in ((tls, good), (rtls, rgood)):
        shutil.copytree(src, dst)
    other_ca = cluster.base / "other-ca"
    certs.new_ca(other_ca)

    # The replication listener refuses the primary's certificate: another CA's, one not for
    # client authentication.
    certs.issue(other_ca, [PRIMARY], cluster.base / "p-other")
    _use(tls, cluster.base / "p-other")
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err.startswith(f"vmreplica: certificate of another CA: {peer} refused the "
                                        f"certificate {tls / 'cert.pem'}: it is not issued by "
                                        f"the CA of {tls / 'ca.pem'}"), err  # fmt: skip
    forge(cluster.ca_dir, PRIMARY, cluster.base / "p-server", [EKU.SERVER_AUTH])
    _use(tls, cluster.base / "p-server")
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err.startswith(f"vmreplica: wrong-usage certificate: {peer} refused "
                                        f"the certificate {tls / 'cert.pem'}: it is not for "
                                        "client authentication"), err  # fmt: skip
    _use(tls, good)
    assert _test_connection(cluster, PRIMARY) == (0, "")

    # The primary refuses the replica's: one not for server authentication, another CA's.
    forge(cluster.ca_dir, REPLICA, cluster.base / "r-client", [EKU.CLIENT_AUTH])
    _use(rtls, cluster.base / "r-client")
    _restart(cluster, REPLICA)
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err == (f"vmreplica: wrong-usage certificate: the certificate of {peer} "
                                 "is not for server authentication"), err  # fmt: skip
    certs.issue(other_ca, [REPLICA], cluster.base / "r-other")
    _use(rtls, cluster.base / "r-other")
    _restart(cluster, REPLICA)
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err == (f"vmreplica: untrusted certificate: the certificate of {peer} "
                                 "is not issued by a CA this host trusts"), err  # fmt: skip
    _use(rtls, rgood)
    _restart(cluster, REPLICA)
    assert _test_connection(cluster, PRIMARY) == (0, "")

    # The management listener: an administrator certificate of another CA, one not for client
    # authentication; a certificate of the CA that names no administrator.
    certs.issue(other_ca, [ADMIN], cluster.base / "a-other")
    code, err = _server_get(cluster, cluster.base / "a-other")
    assert code == 5 and err.startswith(f"vmreplica: certificate of another CA: {REPLICA} refused "
                                        "the certificate"), err  # fmt: skip
    assert "it is not issued by the CA of" in err
    forge(cluster.ca_dir, ADMIN, cluster.base / "a-server", [EKU.SERVER_AUTH])
    code, err = _server_get(cluster, cluster.base / "a-server")
    assert code == 5 and err.startswith(f"vmreplica: wrong-usage certificate: {REPLICA} refused "
                                        "the certificate"), err  # fmt: skip
    certs.issue(cluster.ca_dir, ["stranger.test"], cluster.base / "a-stranger")
    code, err = _server_get(cluster, cluster.base / "a-stranger")
    assert (code, err) == (5, "vmreplica: access denied: certificate stranger.test is not an "
                              "administrator of this host")  # fmt: skip


def test_a_ca_rotation_keeps_replication_up_and_then_refuses_the_old_cas_certificates(
    cluster: Cluster,
) -> None:
    """Each host trusts the old and the new CA (ca.pem holds both), then is issued its
    certificate by the new one, then trusts the new one alone: replication connects at every
    step, and a certificate of the old CA is then refused, in one line naming why."""
    port = cluster.hosts[REPLICA].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=REPLICA)  # fmt: skip
    cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
                str(cluster.base / "r"), "--trust-group", "Production", host=REPLICA)  # fmt: skip
    assert _test_connection(cluster, PRIMARY) == (0, "")
    old = (cluster.ca_dir / "ca.pem").read_bytes()
    new_ca = cluster.base / "new-ca"
    certs.new_ca(new_ca, "vmreplica CA 2")
    new = (new_ca / "ca.pem").read_bytes()
    tls = {h: cluster.hosts[h].dir / "tls" for h in (REPLICA, PRIMARY)}
    old_primary = cluster.base / "old-primary"
    shutil.copytree(tls[PRIMARY], old_primary)

    for step in ("both", "issued", "new only"):
        for host, folder in tls.items():
            if step == "both":
                (folder / "ca.pem").write_bytes(old + new)
            elif step == "issued":
                certs.issue(new_ca, [host], cluster.base / f"{host}-new")
                _use(folder, cluster.base / f"{host}-new")
                (folder / "ca.pem").write_bytes(old + new)  # issue wrote the new CA alone
            else:
                (folder / "ca.pem").write_bytes(new)
            _restart(cluster, host)
        assert _test_connection(cluster, PRIMARY) == (0, ""), step

    _use(tls[PRIMARY], old_primary)  # a certificate of the CA rotated out
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err.startswith(f"vmreplica: certificate of another CA: {REPLICA}:{port} "
                                        f"refused the certificate {tls[PRIMARY] / 'cert.pem'}: "
                                        "it is not issued by the CA of"), err  # fmt: skip
