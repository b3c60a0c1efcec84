"""Failover through the CLI: planned with reverse and fail-back, unplanned to a chosen point,
test failover, and every refusal the failover issue names."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    make_pair,
    restart_with_faults,
    same_content,
    wait_for,
)
from tests.localcluster import Cluster


def two_way(cluster: Cluster) -> Pair:
    """vmhost1 accepts vmhost2 and vmhost2 accepts vmhost1, so replication can be reversed."""
    pair = make_pair(cluster)
    port = cluster.hosts[PRIMARY].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port", str(port),
                host=PRIMARY)  # fmt: skip
    cluster.cli("auth", "new", "--allowed-primary", REPLICA, "--storage-location",
                str(cluster.base / "vmhost2-replicas"), "--trust-group", "Production", host=PRIMARY)  # fmt: skip
    return pair


def reads(cluster: Cluster, host: str, vm: str, pattern: int, offset: str, length: str) -> bool:
    out = cluster.cli(
        "vm", "monitor", vm, f'qemu-io disk0 "read -P {pattern:#x} {offset} {length}"', host=host
    ).stdout
    return "Pattern verification failed" not in out and "read " in out


def state(cluster: Cluster, host: str, vm: str = "contoso2") -> tuple[str, str]:
    row = cluster.cli_json("replication", "get", vm, host=host)[0]
    return str(row["mode"]), str(row["state"])


def new_primary_writes_reach_the_old(pair: Pair, pattern: int, offset: str) -> Path:
    """The new primary (REPLICA) runs contoso2, writes 64 KiB at `offset` and syncs: the old
    primary's replica tip holds every write. The tip's path."""
    cluster = pair.cluster
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, pattern, offset, "64k", host=REPLICA)
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    cluster.cli("vm", "monitor", "contoso2", 'qemu-io disk0 "flush"', host=REPLICA)
    disk = Path(cluster.cli_json("vm", "get", "contoso2", host=REPLICA)[0]["disks"][0])
    tip = Path(cluster.cli_json("vm", "get", "contoso2", host=PRIMARY)[0]["disks"][0])
    assert same_content(disk, tip), "the old primary has every write"
    return tip


def test_planned_failover_reverse_and_fail_back(any_cluster: Cluster) -> None:
    cluster = any_cluster  # on each driver
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x11, "0", "1M")
    pair.enable("contoso2")
    pair.start("contoso2")
    pair.write("contoso2", 0, 0x22, "2M", "1M")

    refused = cluster.cli("failover", "start", "contoso2", "--prepare", host=PRIMARY, check=False)
    assert refused.returncode == 4 and "vm stop contoso2" in refused.stderr
    cluster.cli("vm", "stop", "contoso2", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "contoso2", "--prepare", host=PRIMARY)
    assert state(cluster, PRIMARY) == ("Primary", "PreparedForFailover")
    blocked = cluster.cli("vm", "start", "contoso2", host=PRIMARY, check=False)
    assert blocked.returncode == 4 and "prepared for a planned failover" in blocked.stderr

    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    assert state(cluster, REPLICA) == ("Replica", "FailedOverWaitingCompletion")
    assert pair.measure("contoso2", REPLICA)["health"] == "Warning"

    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    # Only the changes since the failover travelled: nothing was written, so almost nothing.
    assert int(pair.measure("contoso2", REPLICA)["last_replication_size"]) < 1024 * 1024

    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    assert reads(cluster, REPLICA, "contoso2", 0x11, "0", "1M")
    assert reads(cluster, REPLICA, "contoso2", 0x22, "2M", "1M")
    pair.write("contoso2", 0, 0x33, "3M", "512k", host=REPLICA)
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)

    # Fail back the same way: the original layout again, still without a full copy.
    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    cluster.cli("failover", "start", "contoso2", "--prepare", host=REPLICA)
    cluster.cli("failover", "start", "contoso2", host=PRIMARY)
    cluster.cli("replication", "set", "contoso2", "--reverse", host=PRIMARY)
    assert state(cluster, PRIMARY) == ("Primary", "Replicating")
    assert state(cluster, REPLICA) == ("Replica", "Replicating")
    assert int(pair.measure("contoso2", PRIMARY)["last_replication_size"]) < 1024 * 1024
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    for pattern, offset, length in ((0x11, "0", "1M"), (0x22, "2M", "1M"), (0x33, "3M", "512k")):
        assert reads(cluster, PRIMARY, "contoso2", pattern, offset, length)
    pair.write("contoso2", 0, 0x44, "5M", "64k")
    cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    assert pair.measure("contoso2", REPLICA)["health"] == "Normal"


def test_unplanned_and_test_failover(any_cluster: Cluster) -> None:
    cluster = any_cluster  # on each driver
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x10, "0", "64k")
    pair.enable("contoso2", "--recovery-history", "4", "--recovery-point-interval", "1")
    pair.start("contoso2")
    for pattern in (0x21, 0x22, 0x23):
        time.sleep(1.1)
        pair.write("contoso2", 0, pattern, "1M", "64k")
        cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    points = cluster.cli_json("recovery-point", "list", "contoso2", host=REPLICA)
    ids = [p["id"] for p in points if p["kind"] != "Latest"]
    assert len(ids) >= 2

    # Test failover on an older point: a separate VM; replication goes on meanwhile.
    cluster.cli(
        "failover", "start", "contoso2", "--as-test", "--recovery-point", ids[-2], host=REPLICA
    )
    test_vm = cluster.cli_json("vm", "get", "contoso2 - Test", host=REPLICA)[0]
    assert test_vm["state"] == "Off"
    second = cluster.cli("failover", "start", "contoso2", "--as-test", host=REPLICA, check=False)
    assert second.returncode == 4 and "already running" in second.stderr
    cluster.cli("vm", "start", "contoso2 - Test", host=REPLICA)
    pair.write("contoso2", 0, 0x30, "4M", "64k")
    cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    assert state(cluster, REPLICA) == ("Replica", "Replicating")
    cluster.cli("failover", "stop", "contoso2", host=REPLICA)
    names = [v["name"] for v in cluster.cli_json("vm", "list", host=REPLICA)]
    assert names == ["contoso2"]

    # Split brain guard: the VM still runs on the primary.
    guarded = cluster.cli("failover", "start", "contoso2", host=REPLICA, check=False)
    assert guarded.returncode == 4 and "split brain" in guarded.stderr
    nothing = cluster.cli("failover", "complete", "contoso2", "--yes", host=REPLICA, check=False)
    assert nothing.returncode == 4 and "no failover" in nothing.stderr

    # The primary site is lost: fail over to an older point, look, cancel, then the latest.
    cluster.kill(PRIMARY)
    older = ids[0]
    cluster.cli("failover", "start", "contoso2", "--recovery-point", older, host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    assert reads(cluster, REPLICA, "contoso2", 0x10, "0", "64k")
    cluster.cli("failover", "stop", "contoso2", host=REPLICA)
    assert state(cluster, REPLICA) == ("Replica", "Replicating")
    assert cluster.cli_json("vm", "get", "contoso2", host=REPLICA)[0]["state"] == "Off"
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    assert reads(cluster, REPLICA, "contoso2", 0x30, "4M", "64k")
    cluster.cli("failover", "complete", "contoso2", "--yes", host=REPLICA)
    assert state(cluster, REPLICA) == ("Replica", "FailedOver")
    remaining = cluster.cli_json("recovery-point", "list", "contoso2", host=REPLICA)
    assert len([p for p in remaining if p["kind"] != "Latest"]) == 1


def _prepared(cluster: Cluster) -> Pair:
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x11, "0", "1M")
    pair.enable("contoso2")
    pair.start("contoso2")
    pair.write("contoso2", 0, 0x22, "2M", "1M")
    cluster.cli("vm", "stop", "contoso2", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "contoso2", "--prepare", host=PRIMARY)
    return pair


def _killed_at(cluster: Cluster, host: str, point: str, *command: str) -> None:
    restart_with_faults(cluster, host, f"{point}=kill")
    assert cluster.cli(*command, check=False).returncode != 0
    process = cluster.hosts[host].process
    assert process is not None and process.wait(10) == -9
    cluster.hosts[host].process = None
    cluster.start(host)


def test_kill_replica_agent_during_failover_start(cluster: Cluster) -> None:
    _prepared(cluster)
    _killed_at(
        cluster, REPLICA, "failover.after_overlays", "failover", "start", "contoso2", "-c", REPLICA
    )
    assert state(cluster, REPLICA) == ("Replica", "Replicating"), "rolled back"
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    assert reads(cluster, REPLICA, "contoso2", 0x22, "2M", "1M")


def test_kill_old_primary_during_reverse(cluster: Cluster) -> None:
    _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    _killed_at(
        cluster,
        PRIMARY,
        "reverse.after_convert",
        "replication",
        "set",
        "contoso2",
        "--reverse",
        "-c",
        REPLICA,
    )
    # The old primary rolled back: still the primary, prepared, its disk where it was.
    _reverse_again_succeeds(cluster)


def _reverse_again_succeeds(cluster: Cluster) -> None:
    """After a reverse that failed on the old primary: both sides as before it, and a retry
    reverses, with the VM's data on the new primary."""
    assert state(cluster, PRIMARY) == ("Primary", "PreparedForFailover")
    assert state(cluster, REPLICA) == ("Replica", "FailedOverWaitingCompletion")
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    assert reads(cluster, REPLICA, "contoso2", 0x22, "2M", "1M")
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)


def test_qemu_img_killed_on_the_old_primary_during_reverse(cluster: Cluster) -> None:
    """The old primary's agent lives on while its tip's ``qemu-img create`` is killed: the
    reverse fails and changes nothing there (its disk back in place), and a retry succeeds.
    Found by the torture run: the disk stayed moved into the chains and every retry failed."""
    _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    disk = Path(cluster.cli_json("vm", "get", "contoso2", host=PRIMARY)[0]["disks"][0])
    restart_with_faults(cluster, PRIMARY, "qemu-img.create=kill-child-once")
    failed = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert failed.returncode != 0 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert disk.exists(), "the old primary's disk is back where its VM has it"
    _reverse_again_succeeds(cluster)
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")


def test_kill_new_primary_during_reverse(cluster: Cluster) -> None:
    pair = _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    _killed_at(
        cluster,
        REPLICA,
        "reverse.after_local",
        "replication",
        "set",
        "contoso2",
        "--reverse",
        "-c",
        REPLICA,
    )
    # On restart the new primary finishes the reverse: the failback delta is cut and sent.
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x33, "3M", "64k", host=REPLICA)
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    assert pair.measure("contoso2", PRIMARY)["successful_replication_count"] >= 2


def test_qemu_img_killed_while_the_failback_delta_is_cut(cluster: Cluster) -> None:
    """The new primary's agent lives on while its failback delta's ``qemu-img create`` is
    killed: the reverse says so in one line, and the next cycle cuts delta 1 first, so the old
    primary gets every write. Found by the torture run: tracking was left lost instead."""
    pair = _prepared(cluster)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    restart_with_faults(cluster, REPLICA, "qemu-img.create=kill-child-once")
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x44, "5M", "64k", host=REPLICA)
    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    failed = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert failed.returncode != 0 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "the next cycle cuts it" in failed.stderr, failed.stderr
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    tip = new_primary_writes_reach_the_old(pair, 0x55, "6M")
    assert tip.name == "tip.qcow2", tip


def test_refusals(cluster: Cluster) -> None:
    pair = make_pair(cluster)  # one way only: vmhost2 does not accept vmhost1
    cluster.cli("vm", "new", "contoso2", "--disk", "32M", host=PRIMARY)
    pair.enable("contoso2")
    pair.start("contoso2")
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    wrong_side = cluster.cli("failover", "start", "contoso2", host=PRIMARY, check=False)
    assert wrong_side.returncode == 4 and "fail over on its replica server" in wrong_side.stderr
    cluster.cli("vm", "stop", "contoso2", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "contoso2", "--prepare", host=PRIMARY)
    # vmhost2 has no listener, so the replica cannot ask it whether the VM runs: --force.
    cluster.cli("failover", "start", "contoso2", "--force", host=REPLICA)
    # vmhost2 has replication disabled: the reverse is refused with the reason, nothing changes.
    no_port = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert no_port.returncode == 2 and "--replica-port" in no_port.stderr
    port = str(cluster.hosts[PRIMARY].replica_port)
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port", port,
                host=PRIMARY)  # fmt: skip
    unauthorized = cluster.cli("replication", "set", "contoso2", "--reverse", "--replica-port", port,
                               host=REPLICA, check=False)  # fmt: skip
    assert unauthorized.returncode == 5 and "not authorized" in unauthorized.stderr
    assert state(cluster, REPLICA) == ("Replica", "FailedOverWaitingCompletion")
    assert state(cluster, PRIMARY) == ("Primary", "PreparedForFailover")
    cluster.cli("failover", "stop", "contoso2", host=REPLICA)
    cluster.cli("failover", "stop", "contoso2", host=PRIMARY)
    assert state(cluster, PRIMARY) == ("Primary", "Replicating")
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)


# -- delta failback after an unplanned failover -----------------------------------------------


def file_reads(path: Path, pattern: int, offset: str, length: str) -> bool:
    """An image file (its VM off) reads ``pattern`` there, through its backing chain."""
    done = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode in (0, 1) and not done.stderr, done.stderr  # 1: a mismatch
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def disk_of(cluster: Cluster, host: str, vm: str = "contoso2") -> Path:
    return Path(str(cluster.cli_json("vm", "get", vm, host=host)[0]["disks"][0]))


def _replicated_with_unshipped_write(cluster: Cluster) -> Pair:
    """contoso2 replicated from vmhost2, then 0x99@8M written there and never shipped; off."""
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x11, "0", "1M")
    pair.enable("contoso2", "--frequency", "900")
    pair.start("contoso2")
    pair.write("contoso2", 0, 0x22, "2M", "1M")
    cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x99, "8M", "1M")
    # A clean close: the bitmap holding the 0x99 write is stored, tracking stays intact.
    cluster.cli("vm", "stop", "contoso2", "--force", host=PRIMARY)
    return pair


def _assert_failed_back(cluster: Cluster) -> None:
    """The old primary's disk is now its chain tip and reads exactly as the new primary's."""
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    tip = disk_of(cluster, PRIMARY)
    assert tip.name == "tip.qcow2"
    for pattern, offset, length in ((0x11, "0", "1M"), (0x22, "2M", "1M"), (0x33, "3M", "64k")):
        assert file_reads(tip, pattern, offset, length), (pattern, offset)
    assert file_reads(tip, 0, "8M", "1M"), "the unshipped 0x99 write must be gone"
    assert same_content(disk_of(cluster, REPLICA), tip)


def test_unplanned_failover_delta_failback(any_cluster: Cluster) -> None:
    cluster = any_cluster  # on each driver
    """The old primary held a write never shipped, and its agent was down at the failover: the
    reverse sends what the old primary changed as well, instead of asking for a resync."""
    pair = _replicated_with_unshipped_write(cluster)
    cluster.stop(PRIMARY)  # unplanned: the split-brain guard cannot reach it
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x33, "3M", "64k", host=REPLICA)
    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    # Back, it cuts the 0x99 write into its pending log but cannot send it (the replica failed
    # over): the failback finds it there rather than in the bitmap.
    cluster.start(PRIMARY)
    unsent = cluster.cli("replication", "sync", "contoso2", host=PRIMARY, check=False)
    assert unsent.returncode != 0
    assert pair.measure("contoso2")["pending_replication_size"] > 0
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    _assert_failed_back(cluster)
    events = cluster.cli_json("event", "list", host=REPLICA)
    assert not any(e["kind"] == "resync-required" for e in events)

    # Replication goes on from the new primary.
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x44, "5M", "64k", host=REPLICA)
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    assert same_content(disk_of(cluster, REPLICA), disk_of(cluster, PRIMARY))


def test_reverse_refused_while_vm_runs(cluster: Cluster) -> None:
    """Refused with the reason and nothing changed; once the VM is off the failback reads the
    unshipped write from the old primary's bitmap (its agent never went down, so no cycle cut
    it into the pending log)."""
    pair = _replicated_with_unshipped_write(cluster)
    primary_disk = disk_of(cluster, PRIMARY)
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x33, "3M", "64k", host=REPLICA)
    refused = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert refused.returncode == 4, refused.stderr
    assert "vm stop contoso2" in refused.stderr and "running" in refused.stderr
    assert state(cluster, REPLICA) == ("Replica", "FailedOverWaitingCompletion")
    assert state(cluster, PRIMARY) == ("Primary", "Replicating")
    assert disk_of(cluster, PRIMARY) == primary_disk and file_reads(primary_disk, 0x99, "8M", "1M")

    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    _assert_failed_back(cluster)


def test_failback_to_an_older_point_after_complete(cluster: Cluster) -> None:
    """A failover to an older recovery point, completed: the old primary still holds what the
    deleted newer points held, and the failback delta overwrites it with the older content."""
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x11, "0", "1M")
    pair.enable("contoso2", "--recovery-history", "4", "--recovery-point-interval", "1")
    pair.start("contoso2")
    for pattern, at in ((0x21, "1M"), (0x22, "18M")):
        time.sleep(1.1)
        pair.write("contoso2", 0, pattern, "1M", "64k")
        pair.write("contoso2", 0, pattern, at, "64k")
        cluster.cli("replication", "sync", "contoso2", host=PRIMARY)
    points = cluster.cli_json("recovery-point", "list", "contoso2", host=REPLICA)
    ids = [p["id"] for p in points if p["kind"] != "Latest"]
    cluster.cli("vm", "stop", "contoso2", "--force", host=PRIMARY)
    # The oldest point with the 0x21 writes, not the 0x22 ones.
    older = next(i for i in ids if _point_reads(cluster, pair, i, 0x21))
    cluster.cli("failover", "start", "contoso2", "--recovery-point", str(older), host=REPLICA)
    cluster.cli("failover", "complete", "contoso2", "--yes", host=REPLICA)
    cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA)
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    tip = disk_of(cluster, PRIMARY)
    assert file_reads(tip, 0x21, "1M", "64k") and file_reads(tip, 0, "18M", "64k")
    assert same_content(disk_of(cluster, REPLICA), tip)


def _point_reads(cluster: Cluster, pair: Pair, point: str, pattern: int) -> bool:
    rp = pair.storage / "contoso2" / "disk0" / f"rp-{point}.qcow2"
    return file_reads(rp, pattern, "1M", "64k")


def test_reverse_after_tracking_lost_requires_resync(cluster: Cluster) -> None:
    """The old primary's QEMU was killed: its bitmap cannot be trusted, so no delta is exact."""
    pair = two_way(cluster)
    cluster.cli("vm", "new", "contoso2", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "contoso2", host=PRIMARY)
    pair.write("contoso2", 0, 0x11, "0", "1M")
    pair.enable("contoso2")
    pair.start("contoso2")
    marker = str(cluster.hosts[PRIMARY].state_dir).encode()
    for pid in cluster.qemu_pids():
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: state(cluster, PRIMARY)[1] == "WaitingForStartResynchronize", 30, "resync")
    cluster.cli("failover", "start", "contoso2", host=REPLICA)
    answer = cluster.cli("replication", "set", "contoso2", "--reverse", host=REPLICA, check=False)
    assert answer.returncode == 9 and "resynchronization is required" in answer.stderr
    assert state(cluster, REPLICA) == ("Primary", "WaitingForStartResynchronize")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")

    # A resynchronization from the new primary leads out of it, the VM running there.
    cluster.cli("vm", "start", "contoso2", host=REPLICA)
    pair.write("contoso2", 0, 0x55, "6M", "64k", host=REPLICA)
    cluster.cli("replication", "resume", "contoso2", "--resynchronize", "--wait", host=REPLICA,
                timeout=600)  # fmt: skip
    assert state(cluster, REPLICA) == ("Primary", "Replicating")
    assert state(cluster, PRIMARY) == ("Replica", "Replicating")
    pair.write("contoso2", 0, 0x56, "7M", "64k", host=REPLICA)
    cluster.cli("replication", "sync", "contoso2", host=REPLICA)
    cluster.cli("vm", "stop", "contoso2", "--force", host=REPLICA)
    tip = disk_of(cluster, PRIMARY)
    assert tip.name == "tip.qcow2" and same_content(disk_of(cluster, REPLICA), tip)
