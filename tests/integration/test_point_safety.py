"""Recovery points and failovers on the replica when a step is cut short, on real agents and
QEMU: a merge of the oldest point left unfinished never takes away a point a failover runs on,
and a ``failover complete`` cut by kill -9 is finished at the next start (a cancel then could put
the replica back on a chain that lost its newer points)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    replicated_vm,
    restart_with_faults,
    verified_equal,
)
from tests.integration.test_failover import file_reads
from tests.localcluster import Cluster


def point_ids(pair: Pair, vm: str = "app") -> list[str]:
    rows = pair.json("recovery-point", "list", vm, host=REPLICA)
    return [str(p["id"]) for p in rows if p["id"] != "Latest"]


def replica_state(pair: Pair, vm: str = "app") -> str:
    return str(pair.replication(vm, REPLICA)["state"])


def new_point(pair: Pair, pattern: int, offset: str, vm: str = "app") -> None:
    """A write, replicated once the point interval (1 s) has passed: the delta makes a point."""
    time.sleep(1.1)
    pair.write(vm, 0, pattern, offset, "64k")
    pair.cli("replication", "sync", vm)


def test_an_unfinished_merge_spares_the_point_a_failover_runs_on(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "1", "--recovery-point-interval", "1")
    new_point(pair, 0x21, "1M")
    assert point_ids(pair) == ["1"]
    # Folding point 1 into the base fails (as on a full disk), and so does finishing it right
    # after: the replica is quarantined, the merge journaled and unfinished, point 1 listed.
    restart_with_faults(cluster, REPLICA, "replica.mid_prune=error")
    new_point(pair, 0x22, "2M")
    assert point_ids(pair) == ["1", "2"]
    assert pair.replication("app", REPLICA)["health"] == "Critical"
    # The primary site is lost; the operator fails over to the listed point 1.
    cluster.kill(PRIMARY)
    pair.cli("failover", "start", "app", "--recovery-point", "1", "--force", host=REPLICA)
    overlay = Path(str(pair.json("vm", "get", "app", host=REPLICA)[0]["disks"][0]))
    assert file_reads(overlay, 0x21, "1M", "64k")
    # The next start finishes what it can: never by folding away the point the VM runs on.
    cluster.stop(REPLICA)
    cluster.start(REPLICA)
    chain = pair.tip("app", 0).parent
    assert (chain / "rp-1.qcow2").exists(), "the failed-over VM's point was merged away"
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", str(overlay)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert file_reads(overlay, 0x21, "1M", "64k") and file_reads(overlay, 0, "2M", "64k")
    assert point_ids(pair)[0] == "1"
    assert replica_state(pair) == "FailedOverWaitingCompletion"
    # Cancelled, replication goes on; the merge waited, and now happens.
    pair.cli("failover", "stop", "app", host=REPLICA)
    cluster.start(PRIMARY)
    new_point(pair, 0x23, "3M")
    assert "1" not in point_ids(pair) and len(point_ids(pair)) == 1
    verified_equal(pair)


def test_kill_mid_complete_finishes_it_at_the_next_start(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "4", "--recovery-point-interval", "1")
    new_point(pair, 0x21, "1M")
    new_point(pair, 0x22, "2M")
    assert point_ids(pair) == ["1", "2"]
    cluster.kill(PRIMARY)
    pair.cli("failover", "start", "app", "--recovery-point", "1", "--force", host=REPLICA)
    restart_with_faults(cluster, REPLICA, "failover.mid_complete=kill")
    cut = pair.cli("failover", "complete", "app", "--yes", host=REPLICA, check=False)
    assert cut.returncode != 0
    died_by_sigkill(cluster, REPLICA)
    chain = pair.tip("app", 0).parent
    assert not (chain / "tip.qcow2").exists(), "the complete was cut after deleting tip"
    cluster.start(REPLICA)
    # The tip is gone: the failover can only be completed, never cancelled back onto a chain
    # that lost it (replication would go on from there, its acknowledged deltas missing).
    assert replica_state(pair) == "FailedOver"
    assert not (chain / "rp-2.qcow2").exists()
    assert point_ids(pair) == ["1"]
    stop = pair.cli("failover", "stop", "app", host=REPLICA, check=False)
    assert stop.returncode != 0 and "Traceback" not in stop.stderr
    assert replica_state(pair) == "FailedOver"
    overlay = Path(str(pair.json("vm", "get", "app", host=REPLICA)[0]["disks"][0]))
    assert file_reads(overlay, 0x21, "1M", "64k") and file_reads(overlay, 0, "2M", "64k")
