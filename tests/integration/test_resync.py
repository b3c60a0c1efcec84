"""Resynchronization, on real agents and QEMU: every trigger leads to a resync that ends with the
replica equal to the primary and every earlier recovery point unchanged; only differing blocks
travel; suspend and continue do not start over; stop leaves the replica byte-identical; a
kill -9 of either agent mid-resync is continued."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests import guest
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    replicated_vm,
    restart_with_faults,
    verified_equal,
    wait_for,
)
from tests.integration.test_end_to_end import GUEST_CACHE
from tests.integration.test_failover import two_way
from tests.localcluster import Cluster

MiB = 1 << 20


def state(pair: Pair, host: str = PRIMARY, vm: str = "app") -> str:
    return str(pair.replication(vm, host)["state"])


def lose_tracking(pair: Pair, vm: str = "app") -> None:
    """Kill the VM's QEMU: its bitmaps are left in use, so tracking is lost. What the guest
    wrote was flushed first (what was not is lost, like any write a crash interrupts)."""
    pair.cli("vm", "monitor", vm, 'qemu-io disk0 "flush"')
    for pid in pair.cluster.qemu_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if f"guest={vm}".encode() in cmdline:
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: state(pair, vm=vm) == "WaitingForStartResynchronize", 30, "resync required")


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def points(pair: Pair, vm: str = "app") -> list[dict[str, Any]]:
    return [p for p in pair.json("recovery-point", "list", vm, host=REPLICA) if p["id"] != "Latest"]


def point_contents(pair: Pair, vm: str = "app") -> dict[str, str]:
    """What each recovery point reads (its whole chain), as a digest of a flat copy."""
    chain = pair.tip(vm, 0).parent
    out = {}
    for point in points(pair, vm):
        flat = chain.parent / f"flat-{point['id']}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw",
                        str(chain / f"rp-{point['id']}.qcow2"), str(flat)], check=True)  # fmt: skip
        out[point["id"]] = hashlib.sha256(flat.read_bytes()).hexdigest()
        flat.unlink()
    return out


def resync(pair: Pair, vm: str = "app", *extra: str) -> None:
    pair.cli("replication", "resume", vm, "--resynchronize", "--wait", *extra, timeout=600)
    assert state(pair, vm=vm) == "Replicating"
    assert state(pair, REPLICA, vm) == "Replicating"


def compared_blocks(cluster: Cluster, vm: str = "app") -> list[tuple[int, int]]:
    """(first, last) block ranges the primary compared, from its log."""
    pattern = re.compile(rf"resync of {vm}: disk 0 blocks (\d+)-(\d+) compared")
    return [(int(a), int(b)) for a, b in pattern.findall(cluster.hosts[PRIMARY].log.read_text())]


def test_lost_tracking_resynchronizes_keeping_every_point(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "4", "--recovery-point-interval", "1")
    for pattern in (0x21, 0x22):
        time.sleep(1.1)
        pair.write("app", 0, pattern, f"{pattern - 0x1F}M", "256k")
        pair.cli("replication", "sync", "app")
    before = point_contents(pair)
    assert len(before) == 2
    pair.write("app", 0, 0x31, "8M", "512k")  # never replicated: only the resync carries it
    lose_tracking(pair)
    measured = pair.measure("app")
    assert measured["health"] == "Critical"
    pair.cli("vm", "start", "app")
    pair.write("app", 0, 0x32, "20M", "256k")
    resync(pair)
    # Only differing blocks travelled: 768 KiB changed on a 64 MiB disk.
    finished = re.findall(r"resync of app finished: (\d+) blocks compared in [\d.]+ s of "
                          r"hashing, (\d+) differ", cluster.hosts[PRIMARY].log.read_text())  # fmt: skip
    compared, differ = map(int, finished[-1])
    assert compared == 1024 and 0 < differ * 64 * 1024 < 4 * MiB, finished
    after = point_contents(pair)
    assert {k: after[k] for k in before} == before, "earlier points unchanged"
    # The resync adds a point; the first cycle after it may add another (interval 1 s).
    assert len(after) >= len(before) + 1, "the resync adds a point"
    pair.cli("replication", "sync", "app")
    verified_equal(pair)
    assert pair.measure("app")["health"] == "Normal"


def test_overgrown_log_sequence_gap_and_replaced_disk_resynchronize(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    # The pending log outgrows half the disk while the replica is away.
    cluster.stop(REPLICA)
    pair.write("app", 0, 0x40, "24M", "36M")
    overgrown = pair.cli("replication", "sync", "app", check=False)
    assert overgrown.returncode == 9 and "pending log" in overgrown.stderr, overgrown
    cluster.start(REPLICA)
    resync(pair)
    pair.cli("replication", "sync", "app")  # the first cycle after it may be applying now
    verified_equal(pair)

    # A delta lost from the pending log: the replica refuses the next one.
    cluster.stop(REPLICA)
    for pattern in (0x41, 0x42):
        pair.write("app", 0, pattern, "9M", "64k")
        assert pair.cli("replication", "sync", "app", check=False).returncode == 6
    pending = (
        cluster.hosts[PRIMARY].state_dir
        / "replication"
        / str(pair.replication("app")["vm_id"])
        / "pending"
    )
    shutil.rmtree(min(pending.iterdir(), key=lambda p: int(p.name)))
    cluster.start(REPLICA)
    assert pair.cli("replication", "sync", "app", check=False).returncode == 9
    resync(pair)
    pair.cli("replication", "sync", "app")  # the first cycle after it may be applying now
    verified_equal(pair)

    # The disk is replaced while the VM is off, outside vmreplica: detected, not assumed.
    pair.cli("vm", "stop", "app", "--force")
    disk = pair.primary_disk("app", 0)
    copy = disk.with_name("copy.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(copy)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x43 30M 64k", str(copy)],
                   check=True, capture_output=True)  # fmt: skip
    os.replace(copy, disk)
    refused = pair.cli("replication", "sync", "app", check=False)
    assert refused.returncode == 9 and "change tracking" in refused.stderr
    assert state(pair) == "WaitingForStartResynchronize"
    resync(pair)
    pair.cli("replication", "sync", "app")  # the first cycle after it may be applying now
    verified_equal(pair)


def test_suspend_continue_and_stop(cluster: Cluster) -> None:
    """A 2 GiB disk takes two batches of 1 GiB; a hold between them lets the test act."""
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "big", "--disk", "2G", host=PRIMARY)
    cluster.cli("vm", "start", "big", host=PRIMARY)
    pair.write("big", 0, 0x51, "0", "1M")
    pair.write("big", 0, 0x52, "1536M", "1M")
    pair.enable("big")
    pair.start("big")
    restart_with_faults(cluster, PRIMARY, "primary.mid_resync=sleep:20")
    pair.write("big", 0, 0x53, "100M", "64k")
    pair.write("big", 0, 0x54, "1600M", "64k")
    lose_tracking(pair, "big")
    cluster.cli("vm", "start", "big", host=PRIMARY)
    chain = pair.tip("big", 0).parent
    untouched = digests(chain)

    # Stop mid-way: the replica is byte-identical to what it was.
    pair.cli("replication", "resume", "big", "--resynchronize")
    wait_for(lambda: len(compared_blocks(cluster, "big")) == 1, 60, "the first batch")
    assert state(pair, REPLICA, "big") == "Resynchronizing"
    pair.cli("replication", "stop", "big")
    assert state(pair, vm="big") == "WaitingForStartResynchronize"
    assert state(pair, REPLICA, "big") == "Replicating"
    assert digests(chain) == untouched

    # Suspend after the first batch, continue: the second batch only, never from zero.
    pair.cli("replication", "resume", "big", "--resynchronize")
    wait_for(lambda: len(compared_blocks(cluster, "big")) == 2, 60, "the first batch again")
    pair.cli("replication", "suspend", "big")
    row = pair.replication("big")
    assert row["state"] == "ResynchronizeSuspended" and row["resynchronization_progress"] == 50.0
    restart_with_faults(cluster, PRIMARY, "")  # no more holding
    pair.cli("replication", "resume", "big", "--continue", "--wait", timeout=600)
    assert state(pair, vm="big") == "Replicating"
    ranges = compared_blocks(cluster, "big")
    assert ranges == [(0, 16383), (0, 16383), (16384, 32767)], ranges
    pair.cli("replication", "sync", "big")
    verified_equal(pair, "big")


def test_kill_either_agent_mid_resync_and_continue(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "big", "--disk", "2G", host=PRIMARY)
    cluster.cli("vm", "start", "big", host=PRIMARY)
    pair.write("big", 0, 0x61, "0", "1M")
    pair.enable("big")
    pair.start("big")
    pair.write("big", 0, 0x62, "10M", "64k")
    pair.write("big", 0, 0x63, "1900M", "64k")
    lose_tracking(pair, "big")
    cluster.cli("vm", "start", "big", host=PRIMARY)
    # The primary dies after the first batch was sent: a restart continues, not from zero.
    restart_with_faults(cluster, PRIMARY, "primary.mid_resync=kill")
    pair.cli("replication", "resume", "big", "--resynchronize")
    died_by_sigkill(cluster, PRIMARY)
    assert state(pair, REPLICA, "big") == "Resynchronizing"
    # The replica dies applying the first delta the restarted primary sends.
    restart_with_faults(cluster, REPLICA, "replica.mid_apply=kill")
    replica = cluster.hosts[REPLICA].process
    assert replica is not None
    cluster.start(PRIMARY)
    wait_for(lambda: replica.poll() is not None, 120, "the replica's death")
    died_by_sigkill(cluster, REPLICA)
    cluster.start(REPLICA)
    pair.write("big", 0, 0x64, "20M", "64k")
    wait_for(lambda: state(pair, vm="big") == "Replicating", 300, "the resync to finish")
    ranges = compared_blocks(cluster, "big")
    assert (0, 16383) in ranges and ranges.count((0, 16383)) == 1, ranges
    pair.cli("replication", "sync", "big")
    verified_equal(pair, "big")


def test_scheduled_and_automatic_resynchronization(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app")
    lose_tracking(pair)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    soon = (datetime.now(UTC) + timedelta(seconds=4)).isoformat(timespec="seconds")
    pair.cli("replication", "resume", "app", "--resynchronize", "--start-time", soon)
    assert state(pair) == "WaitingForStartResynchronize"
    later = (datetime.now(UTC) + timedelta(days=8)).isoformat()
    refused = pair.cli("replication", "resume", "app", "--resynchronize", "--start-time", later,
                       check=False)  # fmt: skip
    assert refused.returncode == 2 and "7 days" in refused.stderr
    wait_for(lambda: state(pair) == "Replicating", 120, "the scheduled resync")
    pair.cli("replication", "sync", "app")  # the first cycle after it may be applying now
    verified_equal(pair)

    # Automatic: inside its window (one that spans the whole day), it starts by itself.
    now = datetime.now().astimezone()
    window = (
        (now - timedelta(minutes=1)).strftime("%H:%M"),
        (now + timedelta(hours=1)).strftime("%H:%M"),
    )
    pair.cli("replication", "set", "app", "--auto-resynchronize", "true",
             "--auto-resynchronize-start", window[0], "--auto-resynchronize-end", window[1])  # fmt: skip
    pair.write("app", 0, 0x71, "12M", "64k")
    lose_tracking(pair)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.cli("replication", "set", "app", "--frequency", "30")  # wakes the schedule
    wait_for(lambda: state(pair) == "Replicating", 120, "the automatic resync")
    kinds = [e["message"] for e in pair.json("event", "list") if e["kind"] == "resync-started"]
    assert any("automatically" in k for k in kinds), kinds
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def test_refusals_change_nothing(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app")
    for args, code, text in (
        (("resume", "app", "--resynchronize"), 4, "replication is Replicating"),
        (("resume", "app", "--continue"), 4, "no suspended resynchronization"),
        (("stop", "app"), 4, "replication is Replicating"),
        (("resume", "app", "--start-time", "2030-01-01T00:00:00Z"), 2, "--resynchronize"),
    ):
        refused = pair.cli("replication", *args, check=False)
        assert refused.returncode == code and text in refused.stderr, (args, refused)
    assert state(pair) == "Replicating"
    assert json.loads(json.dumps(pair.replication("app")))["resynchronization_progress"] is None


def test_real_guest_qemu_killed_while_writing_loses_nothing(cluster: Cluster) -> None:
    """kill -9 of a writing guest's QEMU; the resync runs while the guest writes again; after a
    planned failover the replica holds every record the guest wrote, on a clean ext4."""
    pair = two_way(cluster)  # the replica can ask the primary whether the VM runs there
    assets = guest.build_guest_assets(GUEST_CACHE)
    data = cluster.base / "web-data.qcow2"
    guest.make_data_disk(data, 64)
    cluster.cli("vm", "new", "web", "--disk-path", str(data), "--kernel", str(assets.kernel),
                "--initrd", str(assets.initrd), "--append", guest.kernel_cmdline(), host=PRIMARY)  # fmt: skip

    def records_after(seq: int) -> None:
        serial = next((cluster.hosts[PRIMARY].state_dir / "run").iterdir()) / "serial.log"
        seen = re.compile(r"vmr: records: (\d+)")

        def written() -> bool:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            return any(int(n) > seq for n in seen.findall(text))

        wait_for(written, 90, f"records after {seq}")

    cluster.cli("vm", "start", "web", host=PRIMARY)
    records_after(0)
    pair.enable("web")
    pair.start("web")
    pair.cli("replication", "sync", "web")
    lose_tracking(pair, "web")
    died = guest.verify_records(data)
    assert died.count > 0 and not died.errors, died.details

    cluster.cli("vm", "start", "web", host=PRIMARY)
    records_after(died.count + 50)
    resync(pair, "web")
    records_after(died.count + 150)
    cluster.cli("vm", "stop", "web", host=PRIMARY)  # the power button: the guest stops cleanly
    written = guest.verify_records(data)
    assert written.fsck_clean and not written.errors and written.count > died.count
    pair.cli("failover", "start", "web", "--prepare")
    pair.cli("failover", "start", "web", host=REPLICA)
    arrived = guest.verify_records(pair.storage / "web" / "failover" / "disk0.qcow2")
    assert arrived.fsck_clean and not arrived.errors, arrived.details
    assert (arrived.count, arrived.last_seq) == (written.count, written.last_seq), "no data loss"
