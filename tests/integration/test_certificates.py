"""Certificates out of their dates or revoked, against real agents on both TLS listeners (the
replication listener and the management API): each refused with its own one-line reason, and a
revocation list (host.toml [tls] crl) reloaded on SIGHUP without a restart."""

from __future__ import annotations

import datetime as dt
import os
import signal
import tomllib
from pathlib import Path

import tomli_w

from tests.integration.test_server_auth import one_line_error
from tests.localcluster import ADMIN, Cluster
from vmreplica._internal import certs

REPLICA, PRIMARY, OTHER = "vmhost1", "vmhost2", "vmhost3"
DAY = dt.timedelta(days=1)


def _test_connection(cluster: Cluster, host: str) -> tuple[int, str]:
    port = str(cluster.hosts[REPLICA].replica_port)
    done = cluster.cli("replication", "test-connection", "--replica-server", REPLICA,
                       "--replica-port", port, host=host, check=False)  # fmt: skip
    return done.returncode, one_line_error(done.stderr) if done.returncode else ""


def _reissue(cluster: Cluster, out: Path, name: str, start: dt.datetime, end: dt.datetime) -> None:
    certs.issue(cluster.ca_dir, [name], out, not_before=start, not_after=end)


def _set_crl(cluster: Cluster, host: str, crl: Path) -> None:
    config = cluster.hosts[host].config
    data = tomllib.loads(config.read_text())
    data["tls"]["crl"] = str(crl)
    config.write_text(tomli_w.dumps(data))
    cluster.stop(host)
    cluster.start(host)


def _hup(cluster: Cluster, host: str) -> None:
    process = cluster.hosts[host].process
    assert process is not None
    before = len(cluster.cli_json("event", "list", host=host))
    os.kill(process.pid, signal.SIGHUP)
    events = cluster.cli_json("event", "list", host=host)
    for _ in range(100):
        if len(events) > before and events[-1]["kind"].startswith("crl-"):
            break
        events = cluster.cli_json("event", "list", host=host)
    assert events[-1]["kind"] == "crl-reloaded", events[-1]


def _admin_cli(cluster: Cluster, admin: Path) -> Path:
    """A CLI config like the cluster's, with another administrator certificate."""
    data = tomllib.loads(cluster.cli_config.read_text())
    for entry in data["hosts"].values():
        entry["cert"], entry["key"] = str(admin / "cert.pem"), str(admin / "key.pem")
        entry["crl"] = str(cluster.ca_dir / "crl.pem")
    path = admin / "cli.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_dates_and_revocation_are_refused_on_both_listeners(cluster: Cluster) -> None:
    port = cluster.hosts[REPLICA].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=REPLICA)  # fmt: skip
    for primary in (PRIMARY, OTHER):
        cluster.cli("auth", "new", "--allowed-primary", primary, "--storage-location",
                    str(cluster.base / "r"), "--trust-group", "Production", host=REPLICA)  # fmt: skip
    assert _test_connection(cluster, PRIMARY) == (0, "")
    now = dt.datetime.now(dt.UTC)
    tls = cluster.hosts[PRIMARY].dir / "tls"
    good = {f: (tls / f).read_bytes() for f in ("cert.pem", "key.pem")}

    # The replication listener: the primary's certificate expired, then not valid yet.
    _reissue(cluster, tls, PRIMARY, now - 10 * DAY, now - DAY)
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err.startswith(f"vmreplica: expired certificate: {REPLICA}:{port} "
                                        "refused the certificate"), err  # fmt: skip
    _reissue(cluster, tls, PRIMARY, now + DAY, now + 10 * DAY)
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err.startswith("vmreplica: certificate not yet valid:"), err
    for name, data in good.items():
        (tls / name).write_bytes(data)
    assert _test_connection(cluster, PRIMARY) == (0, "")

    # Revocation: the replica checks a CRL; a host revoked after it started is refused once
    # the agent is sent SIGHUP, while the others still get in.
    crl, count = certs.write_crl(cluster.ca_dir)
    assert count == 0
    _set_crl(cluster, REPLICA, crl)
    assert _test_connection(cluster, OTHER) == (0, "")
    # Every host gets the CRL: a replica's refusal can reach the sender as a reset that overtakes
    # the TLS alert, and the sender then finds its own certificate in its own copy of the CRL.
    _set_crl(cluster, OTHER, crl)
    certs.write_crl(cluster.ca_dir, [cluster.hosts[OTHER].dir / "tls" / "cert.pem"])
    assert _test_connection(cluster, OTHER) == (0, "")  # not reloaded yet
    _hup(cluster, REPLICA)
    code, err = _test_connection(cluster, OTHER)
    assert code == 6 and err.startswith("vmreplica: revoked certificate:"), err
    assert _test_connection(cluster, PRIMARY) == (0, "")

    # The management listener: an administrator certificate expired, then one revoked.
    expired_admin = cluster.base / "admin-expired"
    _reissue(cluster, expired_admin, ADMIN, now - 10 * DAY, now - DAY)
    real_config = cluster.cli_config
    try:
        cluster.cli_config = _admin_cli(cluster, expired_admin)
        refused = cluster.cli("server", "get", "-c", REPLICA, check=False)
        assert refused.returncode == 5, refused.stderr
        assert one_line_error(refused.stderr).startswith("vmreplica: expired certificate:")
        revoked_admin = cluster.base / "admin-revoked"
        certs.issue(cluster.ca_dir, [ADMIN], revoked_admin)
        cluster.cli_config = _admin_cli(cluster, revoked_admin)
        assert cluster.cli("server", "get", "-c", REPLICA, check=False).returncode == 0
        certs.write_crl(cluster.ca_dir, [revoked_admin / "cert.pem"])
        _hup(cluster, REPLICA)
        refused = cluster.cli("server", "get", "-c", REPLICA, check=False)
        assert refused.returncode == 5, refused.stderr
        assert one_line_error(refused.stderr).startswith("vmreplica: revoked certificate:")
    finally:
        cluster.cli_config = real_config
    assert cluster.cli("server", "get", "-c", REPLICA, check=False).returncode == 0

    # The primary checks the replica's certificate against its own CRL too.
    certs.write_crl(cluster.ca_dir, [cluster.hosts[REPLICA].dir / "tls" / "cert.pem"])
    _set_crl(cluster, PRIMARY, crl)
    code, err = _test_connection(cluster, PRIMARY)
    assert code == 6 and err == (f"vmreplica: revoked certificate: the certificate of "
                                 f"{REPLICA}:{port} is revoked (this host's CRL lists it)"), err  # fmt: skip
