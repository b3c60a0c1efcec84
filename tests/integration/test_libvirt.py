"""The libvirt driver beyond the tests both drivers run (test_replication.py, test_failover.py):
VMs as libvirt domains, a replica that has no domain until failover, kill -9 of the agent and of
libvirtd during a cycle, a mixed pair (libvirt primary, built-in runtime replica), and a raw
block device replicated in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_failover
from tests.integration.conftest import driver_cluster
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    make_pair,
    replicated_vm,
    restart_with_faults,
    verified_equal,
    wait_for,
)
from tests.libvirt_host import LibvirtHost
from tests.localcluster import Cluster


@pytest.fixture
def lv_cluster() -> Iterator[Cluster]:
    with driver_cluster("libvirt") as c:
        yield c


def test_vm_is_a_libvirt_domain_and_replicates(lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair = make_pair(cluster)
    replicated_vm(pair)
    primary, replica = cluster.libvirt[PRIMARY], cluster.libvirt[REPLICA]
    vm_id = cluster.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"]
    assert primary.virsh("domstate", "app").stdout.strip() == "running"
    assert primary.virsh("domuuid", "app").stdout.strip() == vm_id
    checkpoints = primary.virsh("checkpoint-list", "app", "--name").stdout.split()
    assert checkpoints == ["vmr-1"], checkpoints
    # The replica VM is no domain until a failover: nothing for `virsh start` to start.
    refused = replica.virsh("start", "app", check=False)
    assert refused.returncode != 0 and "failed to get domain" in refused.stderr

    pair.write("app", 0, 0x33, "2M", "512k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair, "app")
    # The committed generation is the one checkpoint left: the older one went once the delta
    # was durable.
    assert primary.virsh("checkpoint-list", "app", "--name").stdout.split() == ["vmr-2"]
    cluster.cli("vm", "stop", "app", "--force", host=PRIMARY)
    assert primary.virsh("domstate", "app").stdout.strip() == "shut off"
    # A VM that is off: the driver starts the domain paused for the cycle, and stops it again.
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    assert primary.virsh("domstate", "app").stdout.strip() == "shut off"
    assert primary.virsh("checkpoint-list", "app", "--name").stdout.split() == ["vmr-3"]
    cluster.cli("vm", "remove", "app", "--force", host=REPLICA, check=False)
    cluster.cli("replication", "remove", "app", host=PRIMARY)
    assert primary.virsh("checkpoint-list", "app", "--name").stdout.split() == []
    cluster.cli("vm", "remove", "app", host=PRIMARY)
    assert primary.virsh("list", "--all", "--name").stdout.split() == []


def test_kill_agent_and_libvirtd_mid_cycle(lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair = make_pair(cluster)
    replicated_vm(pair)
    libvirtd = cluster.libvirt[PRIMARY]

    # The agent dies between the cut and the commit: the next cycle still ships every write.
    pair.write("app", 0, 0x22, "2M", "512k")
    restart_with_faults(cluster, PRIMARY, "primary.after_cut=kill")
    assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    process = cluster.hosts[PRIMARY].process
    assert process is not None and process.wait(10) == -signal.SIGKILL
    cluster.hosts[PRIMARY].process = None
    cluster.start(PRIMARY)
    pair.write("app", 0, 0x33, "3M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)

    # libvirtd dies (kill -9) while a cycle waits between its cut and its commit; the domain
    # runs on, a new libvirtd takes it back, and the agent reconnects.
    pair.write("app", 0, 0x44, "5M", "1M")
    restart_with_faults(cluster, PRIMARY, "primary.after_cut=sleep:6")
    sync = subprocess.Popen(
        [sys.executable, "-m", "vmreplica", "replication", "sync", "app"],
        env=cluster.env(PRIMARY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)
    libvirtd.kill()
    libvirtd.start()
    sync.communicate(timeout=120)
    assert libvirtd.virsh("domstate", "app").stdout.strip() == "running"
    pair.write("app", 0, 0x55, "7M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)
    assert pair.replication("app")["state"] == "Replicating"


def _cli_in_background(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmreplica", *args],
        env=cluster.env(PRIMARY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _checkpoints(libvirtd: LibvirtHost) -> list[str]:
    return libvirtd.virsh("checkpoint-list", "app", "--name", check=False).stdout.split()


def _kill_libvirtd_in_job(libvirtd: LibvirtHost, checkpoints: int) -> None:
    """Once the backup began (its checkpoint is there; the agent then sleeps at the fault
    point, the job up), kill -9 of libvirtd and a new one. Killed inside virDomainBackupBegin
    itself, libvirt 9.0's new daemon keeps the domain's job lock ("held by monitor=init")
    for good: not what this tests (docs/ARCHITECTURE.md)."""
    wait_for(lambda: len(_checkpoints(libvirtd)) == checkpoints, 60, "the backup to begin")
    time.sleep(5)  # backupBegin has returned: the agent is at the fault point (15 s)
    libvirtd.kill()
    libvirtd.start()


def _until_ok(cluster: Cluster, *args: str, within: float = 240) -> None:
    """The command as the scheduler would retry it, until it succeeds."""
    deadline = time.monotonic() + within
    while True:
        done = cluster.cli(*args, host=PRIMARY, check=False, timeout=600)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stderr
        time.sleep(10)


@pytest.mark.timeout(600)
def test_kill_libvirtd_during_a_pull_backup(lv_cluster: Cluster) -> None:
    """kill -9 of libvirtd while the initial copy reads a pull backup's NBD export: nothing
    written is lost, the replica ends equal to the primary and verifies, cycles go on."""
    cluster = lv_cluster
    pair = make_pair(cluster)
    libvirtd = cluster.libvirt[PRIMARY]
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "8M")
    pair.enable("app")
    restart_with_faults(cluster, PRIMARY, "libvirt.pull_job=sleep:15")
    initial = _cli_in_background(cluster, "replication", "start-initial", "app", "--wait")
    _kill_libvirtd_in_job(libvirtd, 1)
    initial.communicate(timeout=300)
    restart_with_faults(cluster, PRIMARY, "")
    if pair.replication("app")["state"] != "Replicating":  # it failed: retried
        _until_ok(cluster, "replication", "start-initial", "app", "--wait")
    assert pair.replication("app")["state"] == "Replicating"
    verified_equal(pair, "app")
    pair.write("app", 0, 0x33, "9M", "64k")
    _until_ok(cluster, "replication", "sync", "app")
    verified_equal(pair, "app")


@pytest.mark.timeout(600)
def test_kill_libvirtd_during_a_push_backup(lv_cluster: Cluster) -> None:
    """kill -9 of libvirtd after a cycle's push backup began and before the agent read its
    result: the cycle completes or fails and is retried, and nothing written is lost."""
    cluster = lv_cluster
    pair = make_pair(cluster)
    replicated_vm(pair)
    libvirtd = cluster.libvirt[PRIMARY]
    pair.write("app", 0, 0x22, "2M", "4M")
    restart_with_faults(cluster, PRIMARY, "libvirt.push_job=sleep:15")
    sync = _cli_in_background(cluster, "replication", "sync", "app")
    _kill_libvirtd_in_job(libvirtd, 2)
    sync.communicate(timeout=300)
    assert libvirtd.virsh("domstate", "app").stdout.strip() == "running"
    restart_with_faults(cluster, PRIMARY, "")
    pair.write("app", 0, 0x33, "9M", "64k")
    _until_ok(cluster, "replication", "sync", "app")
    verified_equal(pair, "app")
    assert pair.replication("app")["state"] == "Replicating"


def _qmp(libvirtd: LibvirtHost, command: str, **arguments: object) -> Any:
    text = json.dumps({"execute": command, "arguments": arguments})
    return json.loads(libvirtd.virsh("qemu-monitor-command", "app", text).stdout)["return"]


def test_orphaned_backup_bitmap_is_removed(lv_cluster: Cluster) -> None:
    """What a libvirtd killed inside a backup job can leave: QEMU still holds the job's
    temporary ``backup-vda`` bitmap, which libvirt's new daemon does not know, and every later
    backup fails on it ("Bitmap already exists"). The cycle removes it and goes on."""
    cluster = lv_cluster
    pair = make_pair(cluster)
    replicated_vm(pair)
    libvirtd = cluster.libvirt[PRIMARY]
    nodes = _qmp(libvirtd, "query-named-block-nodes", flat=True)
    node = next(
        n["node-name"]
        for n in nodes
        if any(b["name"] == "vmr-1" for b in n.get("dirty-bitmaps", []))
    )
    _qmp(libvirtd, "block-dirty-bitmap-add", node=node, name="backup-vda")
    pair.write("app", 0, 0x22, "2M", "1M")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair, "app")
    left = [b["name"] for n in _qmp(libvirtd, "query-named-block-nodes", flat=True)
            for b in n.get("dirty-bitmaps", [])]  # fmt: skip
    assert "backup-vda" not in left and "vmr-2" in left, left


def test_mixed_pair_libvirt_primary_builtin_replica() -> None:
    """vmhost2 runs libvirt, vmhost1 the built-in runtime: fail over, reverse, fail back."""
    with driver_cluster("mixed") as cluster:
        test_failover.test_planned_failover_reverse_and_fail_back(cluster)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB raw block device, as an LVM volume or an iSCSI LUN is (this kernel has no
    device-mapper, so a loop device stands in for the logical volume)."""
    backing = tmp_path / "lun.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_raw_block_device_replicates_and_fails_over(loop_device: Path, lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair = test_failover.two_way(cluster)
    cluster.cli("vm", "new", "lun", "--disk-path", str(loop_device), host=PRIMARY)
    cluster.cli("vm", "start", "lun", host=PRIMARY)
    pair.write("lun", 0, 0x11, "0", "1M")
    pair.enable("lun")
    pair.start("lun")
    pair.write("lun", 0, 0x22, "2M", "1M")
    cluster.cli("replication", "sync", "lun", host=PRIMARY)
    verified_equal(pair, "lun")
    # The guest's disk is still the raw device, written in place: no conversion.
    with open(loop_device, "rb") as f:
        f.seek(2 << 20)
        assert f.read(1 << 20) == bytes([0x22]) * (1 << 20)
    assert pair.json("vm", "get", "lun")[0]["disks"] == [str(loop_device)]

    cluster.cli("vm", "stop", "lun", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "lun", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "lun", host=REPLICA)
    cluster.cli("vm", "start", "lun", host=REPLICA)
    assert test_failover.reads(cluster, REPLICA, "lun", 0x11, "0", "1M")
    assert test_failover.reads(cluster, REPLICA, "lun", 0x22, "2M", "1M")


def test_qemu_killed_under_libvirt_requires_resync(lv_cluster: Cluster) -> None:
    """libvirt reports the domain off as crashed: its bitmaps were never stored, so the agent
    trusts none of them, now or after a restart."""
    cluster = lv_cluster
    pair = make_pair(cluster)
    replicated_vm(pair)
    for pid in cluster.libvirt[PRIMARY].qemu_pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: pair.replication("app")["state"] == "WaitingForStartResynchronize",
        30,
        "resync required",
    )
    assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    cluster.cli("vm", "start", "app", host=PRIMARY)
    assert pair.replication("app")["state"] == "WaitingForStartResynchronize"
