"""`[cluster]` in host.toml (cluster_config.py): the etcd URLs and the mutual-TLS files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmreplica._internal import certs
from vmreplica._internal.cluster.etcd import Etcd
from vmreplica._internal.cluster_config import ClusterSettings, parse_cluster
from vmreplica.errors import InvalidArgument, NotFound

HOST_TOML = Path("/etc/vmreplica/host.toml")
HTTPS = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
FILES = {"etcd_ca": "/etc/etcd/ca.pem", "etcd_cert": "node.pem", "etcd_key": "node.key"}


def parse(**table: object) -> ClusterSettings | None:
    return parse_cluster({"name": "r", **table}, HOST_TOML)


def test_https_with_the_three_files() -> None:
    s = parse(etcd=HTTPS, **FILES)
    assert s is not None and s.tls and s.etcd == tuple(HTTPS)
    # Relative paths are relative to host.toml's directory.
    assert (s.etcd_ca, s.etcd_cert, s.etcd_key) == (
        Path("/etc/etcd/ca.pem"), Path("/etc/vmreplica/node.pem"), Path("/etc/vmreplica/node.key"),
    )  # fmt: skip
    assert parse_cluster(s.to_toml(), HOST_TOML) == s


def test_plain_http_is_still_accepted_but_not_authenticated() -> None:
    s = parse(etcd=["http://10.0.0.1:2379"])
    assert s is not None and not s.tls and s.ssl_context() is None
    assert "etcd_ca" not in s.to_toml()
    assert not Etcd(s.etcd).authenticated


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"etcd": HTTPS}, "https:// needs etcd_ca, etcd_cert and etcd_key"),
        ({"etcd": HTTPS, "etcd_ca": "ca.pem"}, "give etcd_ca, etcd_cert and etcd_key together"),
        ({"etcd": HTTPS, "etcd_ca": "a", "etcd_cert": "b"}, "together, or none"),
        ({"etcd": ["http://a:1"], **FILES}, "the TLS files need https:// URLs"),
        ({"etcd": ["http://a:1", "https://b:2"], **FILES}, "every URL must be https://"),
        ({"etcd": HTTPS, **FILES, "etcd_key": 3}, "etcd_key must be a file path"),
        ({"etcd": HTTPS, **FILES, "etcd_ca": ""}, "etcd_ca must be a file path"),
        ({"etcd": ["https://a"], **FILES}, "is not https://HOST:PORT"),
        ({"etcd": "https://a:1", **FILES}, "etcd must be a list of https://HOST:PORT URLs"),
    ],
)
def test_bad_cluster_tables_are_one_line_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse(**table)
    assert message in e.value.message, e.value.message
    assert e.value.message.startswith(f"{HOST_TOML}: [cluster] ")
    assert "\n" not in e.value.message


def test_missing_or_mismatched_files_are_one_line_errors(tmp_path: Path) -> None:
    certs.new_ca(tmp_path / "ca")
    a = certs.issue(tmp_path / "ca", ["a.test"], tmp_path / "a")
    b = certs.issue(tmp_path / "ca", ["b.test"], tmp_path / "b")
    missing = ClusterSettings("r", tuple(HTTPS), 10, a.ca, tmp_path / "nope.pem", a.key)
    with pytest.raises(NotFound) as e:
        missing.ssl_context()
    assert e.value.message == f"certificate not found: {tmp_path / 'nope.pem'}"
    mismatched = ClusterSettings("r", tuple(HTTPS), 10, a.ca, a.cert, b.key)
    with pytest.raises(InvalidArgument) as bad:
        mismatched.ssl_context()
    assert bad.value.message.endswith("they do not match") and "\n" not in bad.value.message
    good = ClusterSettings("r", tuple(HTTPS), 10, a.ca, a.cert, a.key)
    etcd = Etcd(good.etcd, ssl=good.ssl_context())
    assert etcd.authenticated
    asyncio.run(etcd.close())
