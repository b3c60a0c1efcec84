"""Recovery points and failovers on the replica when a step is cut short, on real agents and
QEMU: a merge of the oldest point left unfinished never takes away a point a failover runs on,
and a ``failover complete`` cut by kill -9 is finished at the next start (a cancel then could put
the replica back on a chain that lost its newer points)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fault import tmpfs
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    replicated_vm,
    restart_with_faults,
    same_content,
    verified_equal,
    wait_for,
)
from tests.integration.test_chain import SIZE, Primary
from tests.integration.test_failover import file_reads, two_way
from tests.integration.test_resync import lose_tracking, resync, state
from tests.localcluster import Cluster
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica.errors import StorageError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def point_ids(pair: Pair, vm: str = "app") -> list[str]:
    rows = pair.json("recovery-point", "list", vm, host=REPLICA)
    return [str(p["id"]) for p in rows if p["id"] != "Latest"]


def replica_state(pair: Pair, vm: str = "app") -> str:
    return str(pair.replication(vm, REPLICA)["state"])


def qemu_of(cluster: Cluster, vm: str) -> list[int]:
    """The pids of the QEMU running ``vm``."""
    found = []
    for pid in cluster.qemu_pids():
        try:
            if f"guest={vm}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # gone meanwhile
            pass
    return found


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


def test_kill_mid_merge_is_finished_at_the_next_start(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "1", "--recovery-point-interval", "1")
    new_point(pair, 0x21, "1M")
    assert point_ids(pair) == ["1"]
    # Killed with point 1 folded into the base, point 2 not yet moved onto it.
    restart_with_faults(cluster, REPLICA, "replica.mid_prune=kill")
    time.sleep(1.1)
    pair.write("app", 0, 0x22, "2M", "64k")
    pair.cli("replication", "sync", "app", check=False)
    died_by_sigkill(cluster, REPLICA)
    cluster.start(REPLICA)
    assert point_ids(pair) == ["2"]
    chain = pair.tip("app", 0).parent
    assert not (chain / "rp-1.qcow2").exists()
    assert file_reads(chain / "rp-2.qcow2", 0x21, "1M", "64k")
    assert file_reads(chain / "rp-2.qcow2", 0x22, "2M", "64k")
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def test_a_failover_to_latest_holds_every_delta_applied_before_it(cluster: Cluster) -> None:
    """Deltas applied while a failover waits (for the primary's answer, then for the replica's
    lock) are in the point it freezes: the point is numbered from the row as it is then."""
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "4", "--recovery-point-interval", "2")
    restart_with_faults(cluster, REPLICA, "failover.after_guard=sleep:20")
    failover = subprocess.Popen(
        [sys.executable, "-m", "vmreplica", "failover", "start", "app", "--force"],
        env=cluster.env(REPLICA), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(4)  # it has read the replication's row by now
    pair.write("app", 0, 0x41, "1M", "64k")
    pair.cli("replication", "sync", "app")  # makes point 1
    pair.write("app", 0, 0x42, "2M", "64k")
    pair.cli("replication", "sync", "app")  # within the interval (on a loaded host, maybe not)
    assert point_ids(pair)[0] == "1"
    _, err = failover.communicate(timeout=120)
    assert failover.returncode == 0, err
    overlay = Path(str(pair.json("vm", "get", "app", host=REPLICA)[0]["disks"][0]))
    assert file_reads(overlay, 0x41, "1M", "64k")
    assert file_reads(overlay, 0x42, "2M", "64k"), "the failover's point lacks the last delta"


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


def test_kill_mid_test_failover_stop_is_finished_at_the_next_start(cluster: Cluster) -> None:
    """A test failover stopped, the agent killed with its VM gone but the point still pinned:
    the next start finishes the stop, so the merges it held back go on."""
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "1", "--recovery-point-interval", "1")
    new_point(pair, 0x21, "1M")
    pair.cli("failover", "start", "app", "--as-test", "--recovery-point", "1", host=REPLICA)
    new_point(pair, 0x22, "2M")
    assert point_ids(pair) == ["1", "2"], "the test VM's point is kept meanwhile"
    restart_with_faults(cluster, REPLICA, "failover.mid_test_stop=kill")
    cut = pair.cli("failover", "stop", "app", host=REPLICA, check=False)
    assert cut.returncode != 0
    died_by_sigkill(cluster, REPLICA)
    cluster.start(REPLICA)
    assert [v["name"] for v in pair.json("vm", "list", host=REPLICA)] == ["app"]
    new_point(pair, 0x23, "3M")
    assert point_ids(pair) == ["3"], "point 1 stayed pinned by a test VM that is gone"
    pair.cli("failover", "start", "app", "--as-test", host=REPLICA)
    pair.cli("failover", "stop", "app", host=REPLICA)
    verified_equal(pair)


def test_hashes_wait_for_an_acknowledged_delta_not_yet_applied(cluster: Cluster) -> None:
    """A resynchronization's delta is answered before it is applied; an apply that fails then
    leaves it journaled (the next delta, the finish or a restart applies it). A new compare
    meanwhile (tracking lost again) must hash the replica with that delta in, or a block the
    guest wrote back to what the replica held before reads as equal, is not sent, and the late
    apply then leaves the replica with the delta's older data."""
    pair = make_pair(cluster)
    replicated_vm(pair, "app")
    restart_with_faults(cluster, REPLICA, "replica.apply_behind=error")
    pair.write("app", 0, 0x31, "8M", "64k")
    lose_tracking(pair)
    pair.cli("vm", "start", "app")
    disk = pair.primary_disk("app", 0)
    restart_with_faults(cluster, PRIMARY, "primary.before_land=kill")
    pair.cli("replication", "resume", "app", "--resynchronize")
    # The primary dies with the delta (0x31 at 8M) answered: the replica journaled it, and its
    # apply behind the answer failed.
    primary = cluster.hosts[PRIMARY].process
    assert primary is not None
    wait_for(lambda: primary.poll() is not None, 60, "the primary's death")
    died_by_sigkill(cluster, PRIMARY)
    assert "after its answer failed" in cluster.hosts[REPLICA].log.read_text()
    assert state(pair, REPLICA) == "Resynchronizing"
    # Its QEMU dies too: tracking is lost again.
    for pid in qemu_of(cluster, "app"):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not qemu_of(cluster, "app"), 30, "its QEMU gone")
    cluster.start(PRIMARY)
    wait_for(lambda: state(pair) != "Resynchronizing", 120, "the resync to stop")
    assert state(pair) == "WaitingForStartResynchronize"
    # What the guest wrote before it died: back at 8M what the replica held before the delta.
    written = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0 8M 64k", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    assert written.returncode == 0 and "wrote" in written.stdout, written.stderr
    pair.cli("vm", "start", "app")
    resync(pair)
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def test_a_lowered_history_is_kept_from_the_next_delta(cluster: Cluster) -> None:
    """Fewer points to keep: the oldest are folded into the base at the next delta, not only
    when one makes a point; with none to keep (0), no delta ever makes one, so they stayed."""
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "4", "--recovery-point-interval", "1")
    for pattern, offset in ((0x21, "1M"), (0x22, "2M"), (0x23, "3M")):
        new_point(pair, pattern, offset)
    ids = point_ids(pair)
    assert len(ids) >= 3
    # No point is due for an hour from now on.
    pair.cli("replication", "set", "app", "--recovery-history", "1", "--recovery-point-interval",
             "3600")  # fmt: skip
    pair.write("app", 0, 0x24, "4M", "64k")
    pair.cli("replication", "sync", "app")
    assert point_ids(pair) == ids[-1:]
    pair.cli("replication", "set", "app", "--recovery-history", "0")
    pair.write("app", 0, 0x25, "5M", "64k")
    pair.cli("replication", "sync", "app")
    assert point_ids(pair) == []
    chain = pair.tip("app", 0).parent
    assert not list(chain.glob("rp-*.qcow2"))
    verified_equal(pair)


def test_disk_full_mid_merge_changes_no_point_and_finishes_once_space_is_freed(
    tmp_path: Path,
) -> None:
    """The merge of the oldest point into the base runs out of space: every point still reads
    as it did, the chain verifies, and the merge repeated once there is room finishes it."""
    with tmpfs(tmp_path / "small", "16M") as mnt:
        chain = run(ReplicaChain.create(mnt / "disk", SIZE))
        primary = Primary(tmp_path)
        snaps = {}
        for point_id, pattern in ((1, 0x71), (2, 0x72)):
            assert run(chain.apply_delta(primary.cycle([f"write -P {pattern:#x} 0 3M"])))
            run(chain.freeze_recovery_point(point_id))
            snaps[point_id] = primary.snapshot(str(point_id))
        filler = mnt / "filler"
        # The rest of the file system, to the last block.
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        with pytest.raises(StorageError, match=r"disk full"):
            run(chain.prune_oldest())
        for point_id, snap in snaps.items():
            assert same_content(chain.rp_path(point_id), snap)
        assert same_content(chain.tip, primary.src)
        filler.unlink()
        run(chain.recover())
        run(chain.verify())
        assert run(chain.prune_oldest())
        assert chain.point_ids() == [2]
        assert same_content(chain.rp_path(2), snaps[2]) and same_content(chain.tip, primary.src)
        run(chain.verify())


def test_a_merge_left_unfinished_ends_when_the_replica_becomes_the_primary(
    cluster: Cluster,
) -> None:
    """A merge left journaled (quarantined) by a replica that then failed over and reversed:
    that chain is the new primary's disk's backing now, and no replica step applies to it any
    more; the next start ends the step instead of failing it, on a primary, for ever."""
    pair = two_way(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "1M")
    pair.enable("app", "--recovery-history", "1", "--recovery-point-interval", "1")
    pair.start("app")
    new_point(pair, 0x21, "1M")
    restart_with_faults(cluster, REPLICA, "replica.mid_prune=error")
    new_point(pair, 0x22, "2M")
    assert point_ids(pair) == ["1", "2"]
    cluster.cli("vm", "stop", "app", "--force", host=PRIMARY)
    pair.cli("failover", "start", "app", "--recovery-point", "1", host=REPLICA)
    pair.cli("replication", "set", "app", "--reverse", host=REPLICA)
    assert pair.replication("app", REPLICA)["mode"] == "Primary"
    cluster.stop(REPLICA)
    cluster.start(REPLICA)
    disk = Path(str(pair.json("vm", "get", "app", host=REPLICA)[0]["disks"][0]))
    assert file_reads(disk, 0x21, "1M", "64k") and file_reads(disk, 0, "2M", "64k")
    measured = pair.measure("app", REPLICA)
    assert "takes no changes" not in json.dumps(measured), measured
    pair.cli("vm", "start", "app", host=REPLICA)
    pair.write("app", 0, 0x31, "3M", "64k", host=REPLICA)
    pair.cli("replication", "sync", "app", host=REPLICA)
    assert pair.measure("app", REPLICA)["health"] == "Normal"
