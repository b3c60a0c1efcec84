"""A replica cluster's journaled steps across a takeover (engine/replica/ha.py, handoff.py,
engine/failover/), with real agents, a real 3-member etcd and real QEMU: a step the dead owner
began is finished (or left alone) by the node that takes the VM over, and a former owner that
restarts never undoes or sweeps away what the owner does meanwhile. Nodes and helpers are
test_cluster_ha.py's.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import owned
from tests.integration.replication_env import PRIMARY, REPLICA, verified_equal, wait_for
from tests.integration.test_cluster_ha import applied, broker_cluster, reads, running
from tests.integration.test_cluster_redirect import OTHER
from tests.localcluster import Cluster
from vmreplica._internal.engine.replica.handoff import FILE, STEP_FILE


def journal_kinds(c: Cluster, node: str) -> list[str]:
    db = sqlite3.connect(f"file:{c.hosts[node].state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return [k for (k,) in db.execute("SELECT kind FROM journal ORDER BY id")]
    finally:
        db.close()


def owner_killed_mid_failover(c: Cluster) -> str:
    """The primary's VM stopped, `failover start` on the owner dies at its armed fault point
    (SIGKILL); returns the VM's id."""
    vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
    c.cli("vm", "stop", "app", "--force", host=PRIMARY)
    cut = c.cli("failover", "start", "app", "--force", host=REPLICA, check=False)
    assert cut.returncode != 0
    agent = c.hosts[REPLICA].process
    assert agent is not None and agent.wait(30) == -signal.SIGKILL
    c.hosts[REPLICA].process = None
    return vm_id


def test_a_failover_complete_its_dead_owner_began_is_finished_by_the_next(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """`failover complete` killed on the owner right after it deleted `tip` (which held the
    delta applied after point 1). The node that takes the VM over must know a completion began:
    it finishes it, and refuses a cancel that would resume replication on a chain without that
    delta. The former owner, restarted, leaves the shared facts alone."""
    c = stopped_cluster
    points = ("--recovery-history", "4", "--recovery-point-interval", "1")
    with broker_cluster(c, etcd, "failover.mid_complete=kill", enable=points) as (pair, _):
        vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
        storage = pair.storage / "app"
        time.sleep(1.1)  # the point interval has passed: the next delta makes point 1
        pair.write("app", 0, 0x21, "1M", "64k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        c.cli("replication", "set", "app", "--recovery-point-interval", "3600", host=PRIMARY)
        pair.write("app", 0, 0x22, "2M", "64k")
        c.cli("replication", "sync", "app", host=PRIMARY)  # into tip, no point
        listed = c.cli_json("recovery-point", "list", "app", "-o", "json", host=REPLICA)
        assert [str(p["id"]) for p in listed if p["id"] != "Latest"] == ["1"]
        c.cli("vm", "stop", "app", "--force", host=PRIMARY)
        c.cli("failover", "start", "app", "--recovery-point", "1", "--force", host=REPLICA)
        cut = c.cli("failover", "complete", "app", "--yes", host=REPLICA, check=False)
        assert cut.returncode != 0
        agent = c.hosts[REPLICA].process
        assert agent is not None and agent.wait(30) == -signal.SIGKILL
        c.hosts[REPLICA].process = None
        assert not (storage / "disk0" / "tip.qcow2").exists(), "cut after deleting tip"
        facts = json.loads((storage / FILE).read_text())
        assert facts["replication"]["state"] == "FailedOverWaitingCompletion"

        # OTHER takes the VM over and finishes the completion: no cancel onto that chain.
        wait_for(lambda: owned(c, OTHER) == [vm_id], 30, "the takeover")
        wait_for(
            lambda: pair.replication("app", OTHER)["state"] == "FailedOver", 60,
            "the completion finished on the new owner",
        )  # fmt: skip
        stop = c.cli("failover", "stop", "app", host=OTHER, check=False)
        assert stop.returncode != 0 and "Traceback" not in stop.stderr, stop.stderr
        assert len(stop.stderr.strip().splitlines()) == 1, stop.stderr
        assert pair.replication("app", OTHER)["state"] == "FailedOver"
        listed = c.cli_json("recovery-point", "list", "app", "-o", "json", host=OTHER)
        assert [str(p["id"]) for p in listed if p["id"] != "Latest"] == ["1"]
        assert "failover-complete" not in journal_kinds(c, OTHER)
        c.cli("vm", "start", "app", host=OTHER)  # on point 1
        assert reads(c, OTHER, 0x21, "1M", "64k") and reads(c, OTHER, 0, "2M", "64k")

        # The former owner comes back: its own entry of the completion is finished elsewhere.
        facts = (storage / FILE).read_bytes()
        c.start(REPLICA)
        assert "failover-complete" not in journal_kinds(c, REPLICA)
        assert (storage / FILE).read_bytes() == facts, "a node that does not own it wrote it"
        assert running(c, OTHER) and not running(c, REPLICA)


def test_a_failover_its_dead_owner_began_leaves_the_next_owners_failover_alone(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """`failover start` killed on the owner after it made its overlays: the node that takes the
    VM over fails it over and runs it, writing new data; the former owner, restarted, rolls its
    own entry back without deleting the overlays the running VM writes to."""
    c = stopped_cluster
    with broker_cluster(c, etcd, "failover.after_overlays=kill") as (pair, _):
        vm_id = owner_killed_mid_failover(c)

        wait_for(lambda: owned(c, OTHER) == [vm_id], 30, "the takeover")
        wait_for(
            lambda: c.cli("replication", "get", "app", host=OTHER, check=False).returncode == 0,
            30, "the import on the new owner",
        )  # fmt: skip
        c.cli("failover", "start", "app", "--force", host=OTHER)
        c.cli("vm", "start", "app", host=OTHER)
        pair.write("app", 0, 0x55, "4M", "64k", host=OTHER)
        disk = Path(str(c.cli_json("vm", "get", "app", "-o", "json", host=OTHER)[0]["disks"][0]))
        assert disk.exists()

        c.start(REPLICA)  # the former owner, with its own `failover` entry
        assert "failover" not in journal_kinds(c, REPLICA)
        assert disk.exists(), "the former owner deleted the running VM's overlays"
        c.cli("vm", "monitor", "app", 'qemu-io disk0 "flush"', host=OTHER)
        c.cli("vm", "stop", "app", "--force", host=OTHER)
        c.cli("vm", "start", "app", host=OTHER)
        assert reads(c, OTHER, 0x55, "4M", "64k") and reads(c, OTHER, 0x11, "0", "1M")


def test_a_point_its_dead_owner_was_freezing_holds_no_later_delta(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """The owner killed mid-freeze (a failover to Latest: `tip` renamed to rp-1, no new tip):
    the node that takes the VM over finishes that point, so its own deltas go into a `tip`
    that a later freeze keeps; a failover there to Latest has them."""
    c = stopped_cluster
    with broker_cluster(c, etcd, "replica.after_freeze_rename=kill") as (pair, _):
        chain = pair.storage / "app" / "disk0"
        vm_id = owner_killed_mid_failover(c)
        assert (chain / "rp-1.qcow2").exists() and not (chain / "tip.qcow2").exists()

        wait_for(lambda: owned(c, OTHER) == [vm_id], 30, "the takeover")
        wait_for(
            lambda: c.cli("replication", "get", "app", host=OTHER, check=False).returncode == 0,
            30, "the import on the new owner",
        )  # fmt: skip
        # The primary goes on: its next delta is applied on OTHER, then OTHER fails over.
        c.cli("vm", "start", "app", host=PRIMARY)
        pair.write("app", 0, 0x66, "5M", "64k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        c.cli("vm", "stop", "app", "--force", host=PRIMARY)
        c.cli("failover", "start", "app", "--force", host=OTHER)
        c.cli("vm", "start", "app", host=OTHER)
        assert reads(c, OTHER, 0x11, "0", "1M")
        assert reads(c, OTHER, 0x66, "5M", "64k"), "the failover lacks an acknowledged delta"


def test_a_former_owner_restarting_leaves_the_owners_delta_in_progress_alone(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """The replica VM moved to OTHER; REPLICA keeps its old rows. REPLICA restarts while OTHER
    holds a staged delta it has not applied yet (slowed by a fault point): REPLICA's start-up
    recovery of the shared chains waits for OTHER's write instead of sweeping the stage away,
    and the acknowledged delta is in the replica."""
    c = stopped_cluster
    with broker_cluster(c, etcd, other_faults="replica.before_apply=sleep:12") as (pair, _):
        vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
        storage = pair.storage / "app"
        c.cli("vm", "move", "app", "--to", OTHER, host=REPLICA)
        wait_for(lambda: owned(c, OTHER) == [vm_id], 30, "the move")
        before = json.loads((storage / FILE).read_text())["replication"]["sequence"]
        pair.write("app", 0, 0x77, "6M", "256k")
        sync = subprocess.Popen(
            [sys.executable, "-m", "vmreplica", "replication", "sync", "app"],
            env=c.env(PRIMARY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:

            def staged() -> bool:
                step = (storage / STEP_FILE).read_text() if (storage / STEP_FILE).exists() else ""
                return bool(step) and json.loads(step)["sequence"] == before + 1

            wait_for(staged, 60, "OTHER staging the delta")
            c.stop(REPLICA)
            c.start(REPLICA, timeout=120)  # its recovery waits for OTHER's write
        finally:
            _, err = sync.communicate(timeout=180)
        assert sync.returncode == 0, err
        assert applied(c, OTHER)[0] > before  # (an automatic cycle may have run too)
        verified_equal(pair)
