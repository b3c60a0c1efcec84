from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_cluster import EtcdCluster
from tests.integration.qsd_tools import reap
from tests.libvirt_host import libvirt_hosts
from tests.localcluster import Cluster, open_agent_logs

LIBVIRT_HOSTS = ("vmhost1", "vmhost2")  # the replica and the primary of replication_env


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any]:
    """A test that fails shows the end of its agents' logs: a failure seen once in a full suite
    can then be explained afterwards, though its directory is gone."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for title, text in open_agent_logs():
            report.sections.append((title, text))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three real agents (vmhost1..3) on loopback; always reaped, VMs included."""
    c = Cluster.create()
    try:
        c.start_all()
        yield c
    finally:
        c.close()


@pytest.fixture
def stopped_cluster() -> Iterator[Cluster]:
    """The same hosts, not started: for tests that start agents themselves."""
    c = Cluster.create()
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def driver_cluster(driver: str) -> Iterator[Cluster]:
    """The three agents, vmhost1 and vmhost2 on ``driver``: "qemu", "libvirt" (a private
    libvirtd each, tests/libvirt_host.py), or "mixed" (vmhost2 on libvirt, vmhost1 on QEMU)."""
    if driver == "qemu":
        c = Cluster.create()
        try:
            c.start_all()
            yield c
        finally:
            c.close()
        return
    names = LIBVIRT_HOSTS if driver == "libvirt" else ("vmhost2",)
    with contextlib.ExitStack() as stack:
        # Beside the cluster's directory, not in it: it goes only once each libvirtd is down.
        roots = Path(tempfile.mkdtemp(prefix="vmrlv", dir="/tmp"))
        if os.environ.get("VMREPLICA_KEEP_TEST_DIRS") != "1":
            stack.callback(shutil.rmtree, roots, ignore_errors=True)
        started = stack.enter_context(libvirt_hosts([roots / n for n in names]))
        hosts = dict(zip(names, started, strict=True))
        c = Cluster.create(libvirt={n: h.uri for n, h in hosts.items()})
        c.libvirt = hosts
        stack.callback(c.close)  # agents first, then each libvirtd and its domains
        c.start_all()
        yield c


@pytest.fixture(params=["qemu", "libvirt"])
def any_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The cluster on each driver in turn: the replication and failover tests run on both."""
    with driver_cluster(str(request.param)) as c:
        yield c


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    """A real 3-member etcd on loopback, client TLS with certificates; always stopped."""
    c = EtcdCluster.create()
    try:
        c.start()
        c.wait_healthy()
        yield c
    finally:
        c.close()


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A test's scratch directory for storage daemons it starts: every process whose command
    line names it is killed at the end (test files with other processes define their own)."""
    assert len(str(tmp_path / "qsd" / "qsd.sock")) < 108  # unix socket path limit
    try:
        yield tmp_path
    finally:
        reap(tmp_path)
