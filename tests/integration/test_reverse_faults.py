"""Reverse replication's faults on real agents and QEMU: a reverse that fails on the old
primary, one whose answer the old primary never sent, and a cycle run while the reverse cuts
the failback delta."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from tests.fault import tmpfs
from tests.integration.peer_tools import journal_rows
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    restart_with_faults,
    same_content,
    wait_for,
)
from tests.integration.test_failover import (
    _killed_at,
    _prepared,
    _reverse_again_succeeds,
    new_primary_writes_reach_the_old,
    state,
    two_way,
)
from tests.localcluster import Cluster


def test_a_reverse_that_fails_on_the_old_primary_leaves_its_cycles_running(
    cluster: Cluster,
) -> None:
    """The old primary stops the VM's scheduled cycles for a reverse; one that fails there
    before its disks move (here its tracking cannot be read: another process holds the disk)
    leaves it the primary, and its cycles run again on their own, not only after a restart."""
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    pair.enable("contoso2", "--frequency", "30")
    pair.start("contoso2")
    cluster.cli("failover", "start", "contoso2", host=REPLICA)  # unplanned: the VM is off
    disk = Path(cluster.cli_json("vm", "get", "contoso2", host=PRIMARY)[0]["disks"][0])
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(disk)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1)  # qemu-io has the image open (and locked)
        failed = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA,
                             check=False)  # fmt: skip
        assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    assert state(cluster, PRIMARY) == ("Primary", "Replicating")
    cluster.cli("failover", "stop", "contoso2", host=REPLICA)
    assert state(cluster, REPLICA) == ("Replica", "Replicating")
    before = pair.measure("contoso2")["successful_replication_count"]
    wait_for(lambda: pair.measure("contoso2")["successful_replication_count"] > before, 90,
             "a scheduled cycle of the old primary")  # fmt: skip


def test_kill_old_primary_after_it_became_the_replica_and_before_it_answered(
    cluster: Cluster,
) -> None:
    """The old primary dies once its disks are the replica's chains and recorded, before its
    answer left: the new primary heard nothing and is still failed over. Its retry is answered
    (the old primary no longer knows what it held), so it reverses and asks for a
    resynchronization, instead of being told forever that there is no primary to reverse."""
    pair = _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    _killed_at(cluster, PRIMARY, "reverse.after_become_replica",
               "replication", "set", "contoso2", "--reverse", "-c", REPLICA)  # fmt: skip
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    assert state(cluster, REPLICA) == ("Replica", "FailedOverWaitingCompletion")
    again = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert again.returncode == 9 and "resynchronization is required" in again.stderr, again
    assert state(cluster, REPLICA) == ("Primary", "WaitingForStartResynchronize")
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x77, "9M", "64k", host=REPLICA)
    cluster.cli("replication", "resume", "contoso2", "--resynchronize", "--wait", host=REPLICA,
                timeout=600)  # fmt: skip
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    cluster.cli("vm", "monitor", "contoso2", 'qemu-io disk0 "flush"', host=REPLICA)
    disk = Path(cluster.cli_json("vm", "get", "contoso2", host=REPLICA)[0]["disks"][0])
    tip = Path(cluster.cli_json("vm", "get", "contoso2", host=PRIMARY)[0]["disks"][0])
    assert same_content(disk, tip), "the old primary has every write"


def test_a_reverse_without_tracking_runs_the_new_primarys_schedule(cluster: Cluster) -> None:
    """A reverse answered "tracking lost" (here the old primary's first answer was lost) leaves
    the new primary waiting for a resynchronization with its schedule running: its automatic
    resynchronization window, set afterwards, starts one, and scheduled cycles follow, with no
    agent restart."""
    pair = _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    _killed_at(cluster, PRIMARY, "reverse.after_become_replica",
               "replication", "set", "contoso2", "--reverse", "-c", REPLICA)  # fmt: skip
    again = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert again.returncode == 9 and "resynchronization is required" in again.stderr, again
    now = datetime.now().astimezone()
    window = ((now - timedelta(minutes=1)).strftime("%H:%M"),
              (now + timedelta(hours=1)).strftime("%H:%M"))  # fmt: skip
    cluster.cli("replication", "set", "contoso2", "--frequency", "30", "--auto-resynchronize",
                "true", "--auto-resynchronize-start", window[0], "--auto-resynchronize-end",
                window[1], host=REPLICA)  # fmt: skip
    wait_for(lambda: state(cluster, REPLICA) == ("Primary", "Replicating"), 180,
             "the automatic resynchronization")  # fmt: skip
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x55, "5M", "64k", host=REPLICA)
    before = pair.measure("contoso2", host=REPLICA)["successful_replication_count"]
    wait_for(lambda: pair.measure("contoso2", host=REPLICA)["successful_replication_count"]
             > before, 120, "a scheduled cycle of the new primary")  # fmt: skip


def test_a_cycle_during_the_reverse_does_not_cut_the_failback_delta_again(
    cluster: Cluster,
) -> None:
    """`replication sync` on the new primary while its reverse cuts delta 1 (held at
    ``reverse.after_local`` with the journal entry open): the sync's cycle waits for the VM's
    lock to finish that entry, and finds it finished by the reverse: delta 1 is cut once (a
    second cut would delete the first from the pending log while it is being sent, and start
    tracking over)."""
    pair = _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    restart_with_faults(cluster, REPLICA, "reverse.after_local=sleep:8")
    reverse = subprocess.Popen(
        [sys.executable, "-m", "vmreplica", "replication", "set", "contoso2", "--reverse"],
        env=cluster.env(REPLICA), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: [r["kind"] for r in journal_rows(cluster, REPLICA)] == ["reverse"], 60,
                 "the reverse journaled")  # fmt: skip
        cluster.cli("replication", "sync", "contoso2", host=REPLICA, timeout=180)
    finally:
        _, err = reverse.communicate(timeout=180)
    assert reverse.returncode == 0, err
    recovered = [e["message"] for e in cluster.cli_json("event", "list", host=REPLICA)
                 if e["kind"] == "recovered"]  # fmt: skip
    assert not any("interrupted reverse" in m for m in recovered), recovered
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    new_primary_writes_reach_the_old(pair, 0x66, "7M")


def test_a_storage_location_on_another_file_system_refuses_the_reverse_first(
    cluster: Cluster,
) -> None:
    """The old primary renames its disks into replica chains in the storage location its
    authorization names: on another file system, the reverse is refused in one line naming
    that, before anything changes there; on the same one, a retry reverses."""
    _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    disk = Path(cluster.cli_json("vm", "get", "contoso2", host=PRIMARY)[0]["disks"][0])
    with tmpfs(cluster.base / "vmhost2-replicas", size="16M"):
        refused = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA,
                              check=False)  # fmt: skip
        assert refused.returncode != 0, refused
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "another file system" in refused.stderr, refused.stderr
        assert disk.exists() and journal_rows(cluster, PRIMARY) == []
    _reverse_again_succeeds(cluster)
