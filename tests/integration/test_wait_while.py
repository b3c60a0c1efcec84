"""``replication.get`` with ``wait_while`` (what ``--wait`` asks): held while the state holds,
answered as soon as it changes, and refused with a one-line error for a VM that is not there."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.integration.replication_env import PRIMARY, make_pair
from tests.localcluster import Cluster
from vmreplica.client import Client
from vmreplica.errors import NotFound


def test_get_waits_while_the_state_holds_and_answers_when_it_changes(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    disk = cluster.base / "app.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    pair.cli("vm", "new", "app", "--disk-path", str(disk))
    pair.enable("app")
    client = Client(socket=cluster.hosts[PRIMARY].socket)
    ready = "ReadyForInitialReplication"

    began = time.monotonic()
    rows = client.call("replication.get", {"vm": "app", "wait_while": ready, "wait_sec": 0.6})
    assert rows[0]["state"] == ready
    assert time.monotonic() - began >= 0.5  # held while nothing changed (a lower bound only)

    # Not the state it is in: answered at once (no upper bound asserted on a loaded machine).
    rows = client.call("replication.get", {"vm": "app", "wait_while": "Replicating"})
    assert rows[0]["state"] == ready

    # The state changes while a look is held: the look ends with the new state.
    answer: list[str] = []

    def look() -> None:
        held = Client(socket=cluster.hosts[PRIMARY].socket)
        got = held.call("replication.get", {"vm": "app", "wait_while": ready, "wait_sec": 10})
        answer.append(got[0]["state"])

    waiter = threading.Thread(target=look)
    waiter.start()
    time.sleep(0.3)
    pair.cli("replication", "start-initial", "app", "--wait")
    waiter.join(20)
    assert answer and answer[0] != ready

    with pytest.raises(NotFound):
        client.call("replication.get", {"vm": "nope", "wait_while": ready})
