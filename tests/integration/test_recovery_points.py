"""When the replica makes recovery points, on real agents and QEMU: the initial copy is never
one (however slow the replica is between applying it and deciding), and the first point after
it holds the first delta."""

from __future__ import annotations

import time
from typing import Any

from tests.integration.replication_env import (
    REPLICA,
    Pair,
    make_pair,
    replicated_vm,
    restart_with_faults,
    same_content,
    verified_equal,
)
from tests.localcluster import Cluster

HISTORY = ("--recovery-history", "3", "--recovery-point-interval", "1")


def points(pair: Pair, vm: str = "app") -> list[dict[str, Any]]:
    return [p for p in pair.json("recovery-point", "list", vm, host=REPLICA) if p["id"] != "Latest"]


def next_point_holds_the_next_delta(pair: Pair, before: int = 0) -> None:
    """One write and a cycle after the interval: one more point than ``before``, reading as
    the primary does now (so it is of that delta, not of the initial copy)."""
    time.sleep(1.5)
    pair.write("app", 0, 0x5A, "9M", "256k")
    pair.cli("replication", "sync", "app")
    found = points(pair)
    assert len(found) == before + 1, found
    assert pair.equal("app", 0)  # flushes the primary's disk for the compare below
    rp = pair.tip("app", 0).parent / f"rp-{found[-1]['id']}.qcow2"
    assert same_content(pair.primary_disk("app", 0), rp), "the point holds the last delta"
    verified_equal(pair)


def test_a_slow_replica_makes_no_point_of_the_initial_copy(cluster: Cluster) -> None:
    """The replica is held 3 s after applying the initial copy, before it decides on a point,
    three times the 1 s interval: the initial copy is still not a point."""
    pair = make_pair(cluster)
    restart_with_faults(cluster, REPLICA, "replica.before_point=sleep:3")
    replicated_vm(pair, "app", *HISTORY)
    assert points(pair) == [], "the initial copy is not a recovery point"
    kinds = [e["kind"] for e in pair.json("event", "list", host=REPLICA)]
    assert "recovery-point-created" not in kinds, kinds
    next_point_holds_the_next_delta(pair)


def test_a_compared_initial_copy_makes_no_point_either(cluster: Cluster) -> None:
    """start-initial --compressed ends as a resynchronization does, which adds a point whatever
    the interval; as the initial copy, it adds none. (An hour's interval: the cycle that runs at
    once after it may not make one either, however slow this machine.)"""
    pair = make_pair(cluster)
    pair.cli("vm", "new", "app", "--disk", "64M")
    pair.cli("vm", "start", "app")
    pair.write("app", 0, 0x11, "0", "1M")
    pair.enable("app", "--recovery-history", "3", "--recovery-point-interval", "3600")
    pair.cli("replication", "start-initial", "app", "--compressed", "--wait", timeout=300)
    assert pair.replication("app")["state"] == "Replicating"
    assert points(pair) == [], "the initial copy is not a recovery point"
    # Points go on as usual: the change wakes a cycle, which may make one (1 s passed).
    pair.cli("replication", "set", "app", "--recovery-point-interval", "1")
    pair.cli("replication", "sync", "app")
    next_point_holds_the_next_delta(pair, before=len(points(pair)))
