"""A real Linux guest under write load: replicate it, fail over to every recovery point in turn,
and check each one (ext4 clean after journal replay, records an unbroken prefix of what the
guest wrote); then a planned failover with reverse loses not a single record."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests import guest
from tests.integration.peer_tools import state_db
from tests.integration.replication_env import PRIMARY, REPLICA, wait_for
from tests.integration.test_failover import state, two_way
from tests.localcluster import Cluster

GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


def test_real_guest_every_recovery_point_then_planned_failover(cluster: Cluster) -> None:
    pair = two_way(cluster)
    assets = guest.build_guest_assets(GUEST_CACHE)
    data = cluster.base / "contoso2-data.qcow2"
    guest.make_data_disk(data, 64)
    cluster.cli("vm", "new", "contoso2", "--disk-path", str(data), "--kernel", str(assets.kernel),
                "--initrd", str(assets.initrd), "--append", guest.kernel_cmdline(), host=PRIMARY)  # fmt: skip
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    # Every recovery point must hold records, the first one too: the guest writes before it.
    booted = next((cluster.hosts[PRIMARY].state_dir / "run").iterdir()) / "serial.log"
    wait_for(
        lambda: booted.exists() and "vmr: records:" in booted.read_text(errors="replace"),
        60,
        "the guest's first records",
    )
    pair.enable(
        "contoso2", "--frequency", "30", "--recovery-history", "4", "--recovery-point-interval", "2"
    )
    pair.start("contoso2")
    for _ in range(4):
        time.sleep(2.5)
        cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    # No cycle while the points are read: on a loaded machine one made a point and pruned the
    # oldest between the list and its failover ("no recovery point 1").
    cluster.cli("replication", "suspend", "contoso2", host=PRIMARY)
    points = [p["id"] for p in cluster.cli_json("recovery-point", "list", "contoso2", host=REPLICA)]
    assert len(points) >= 4 and points[-1] == "Latest"

    overlay = pair.storage / "contoso2" / "failover" / "disk0.qcow2"
    previous = 0
    for point in points:
        # The primary still runs under load, so the split-brain guard needs --force here.
        cluster.cli(
            "failover", "start", "contoso2", "--recovery-point", point, "--force", host=REPLICA
        )
        report = guest.verify_records(overlay)
        assert report.fsck_clean, (point, report.details)
        assert not report.errors, (point, report.errors)
        assert report.count > 0 and report.count >= previous, (point, report.count, previous)
        previous = report.count
        cluster.cli("failover", "stop", "contoso2", host=REPLICA)

    cluster.cli("replication", "resume", "contoso2", host=PRIMARY)
    # Planned failover: every record the guest wrote before it stopped is on the replica.
    cluster.cli("vm", "stop", "contoso2", host=PRIMARY)
    written = guest.verify_records(data)
    assert written.fsck_clean and not written.errors
    cluster.cli("failover", "start", "contoso2", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    arrived = guest.verify_records(overlay)
    assert (arrived.count, arrived.last_seq) == (written.count, written.last_seq), "no data loss"
    # The replica boots its own copy of the kernel and initrd, never a path the primary named.
    with state_db(cluster, REPLICA) as conn:
        boot = conn.execute("SELECT kernel, initrd FROM vms WHERE name='contoso2'").fetchone()
    for copied, original in zip(boot, (assets.kernel, assets.initrd), strict=True):
        assert Path(copied).parent == pair.storage / "contoso2" / "boot"
        assert Path(copied).read_bytes() == original.read_bytes()
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    serial = next((cluster.hosts[REPLICA].state_dir / "run").iterdir()) / "serial.log"
    wait_for(
        lambda: serial.exists() and "vmr: records:" in serial.read_text(errors="replace"),
        60,
        "records",
    )
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    cluster.cli("vm", "stop", "contoso2", host=REPLICA)
    continued = guest.verify_records(overlay)
    assert continued.count > written.count and not continued.errors and continued.fsck_clean
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
