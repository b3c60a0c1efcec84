"""The libvirt driver on its own: a VM as a libvirt domain, replicated by the agent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import driver_cluster
from tests.integration.replication_env import PRIMARY, REPLICA, make_pair, verified_equal
from tests.localcluster import Cluster


@pytest.fixture
def lv_cluster() -> Iterator[Cluster]:
    with driver_cluster("libvirt") as c:
        yield c


def test_vm_is_a_libvirt_domain_and_replicates(lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "1M")
    pair.enable("app")
    pair.start("app")
    pair.write("app", 0, 0x33, "2M", "512k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair, "app")
    pair.write("app", 0, 0x44, "8M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair, "app")
    assert pair.replication("app", REPLICA)["state"] == "Replicating"
