"""A client certificate that etcd does not trust is reported as a TLS refusal every time, not
as etcd being down (real 3-member etcd with mutual TLS)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.etcd_cluster import EtcdCluster
from vmreplica._internal import certs
from vmreplica._internal.cluster.etcd import Etcd, EtcdUnavailable


def test_an_untrusted_client_certificate_is_always_a_tls_refusal(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    certs.new_ca(tmp_path / "ca", "not the etcd CA")
    certs.issue(tmp_path / "ca", ["localhost"], tmp_path / "client")
    wrong = certs.etcd_client_ssl_context(
        etcd.ca, tmp_path / "client" / "cert.pem", tmp_path / "client" / "key.pem"
    )

    async def attempt() -> str:
        client = Etcd(etcd.endpoints, timeout=5, ssl=wrong)
        try:
            await client.get_prefix("/vmreplica/")
        except EtcdUnavailable as e:
            return str(e)
        finally:
            await client.close()
        pytest.fail("etcd accepted a client certificate of another CA")

    messages = [asyncio.run(attempt()) for _ in range(10)]
    assert all("TLS refused" in m for m in messages), messages
    # Refused in the handshake itself (TLS 1.2), not after it on a read, where a reset
    # connection can win the race against etcd's alert under load.
    assert all("Cannot connect to host" in m for m in messages), messages

    async def trusted() -> None:
        client = etcd.client(timeout=5)
        try:
            await client.get_prefix("/vmreplica/")
        finally:
            await client.close()

    asyncio.run(trusted())
