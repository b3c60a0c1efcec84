from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.localcluster import Cluster


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
