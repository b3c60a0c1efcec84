"""A raw disk stays raw whatever its guest writes (libvirt driver, drivers/libvirt/raw.py).

A raw disk's first bytes are the guest's to write. Were its format told from them at each start,
a guest that writes a qcow2 header there would have its disk opened as qcow2 by the host: with
a backing file of the guest's choosing (any file of the host), read for it by QEMU."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import driver_cluster
from tests.integration.replication_env import PRIMARY, REPLICA
from tests.integration.test_failover import reads, two_way
from tests.integration.test_server_auth import one_line_error
from tests.localcluster import Cluster


@pytest.fixture
def lv_cluster() -> Iterator[Cluster]:
    with driver_cluster("libvirt") as c:
        yield c


def raw_disk_and_secret(scratch: Path) -> tuple[Path, Path, Path]:
    """An empty 16 MiB raw disk, a host file the guest must never see (16 MiB of 0x5A), and
    where a qcow2 header naming that file is made."""
    disk, secret = scratch / "disk.raw", scratch / "host-secret"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    secret.write_bytes(bytes([0x5A]) * (16 << 20))
    return disk, secret, scratch / "h.qcow2"


def write_qcow2_header(disk: Path, backing: Path, scratch: Path) -> None:
    """What a guest can write at the start of its disk: a qcow2 header naming a host file."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw",
         str(scratch), "16M"],
        check=True,
    )  # fmt: skip
    with open(disk, "r+b") as f:
        f.write(scratch.read_bytes())


def test_a_guest_written_qcow2_header_does_not_make_its_raw_disk_qcow2(
    lv_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = lv_cluster
    disk, secret, header = raw_disk_and_secret(tmp_path)
    cluster.cli("vm", "new", "raw", "--disk-path", str(disk), host=PRIMARY)
    cluster.cli("vm", "start", "raw", host=PRIMARY)
    assert reads(cluster, PRIMARY, "raw", 0x00, "1M", "1M")
    cluster.cli("vm", "stop", "raw", "--force", host=PRIMARY)
    write_qcow2_header(disk, backing=secret, scratch=header)
    cluster.cli("vm", "start", "raw", host=PRIMARY, check=False)
    # Still the raw disk: what lies past the header is the disk's own zeros, never the host's file.
    assert not reads(cluster, PRIMARY, "raw", 0x5A, "1M", "1M")
    assert reads(cluster, PRIMARY, "raw", 0x00, "1M", "1M")
    assert cluster.cli_json("vm", "get", "raw", host=PRIMARY)[0]["disks"] == [str(disk)]


def test_a_raw_disk_without_its_metadata_image_stays_raw(
    lv_cluster: Cluster, tmp_path: Path
) -> None:
    """Another node of a cluster, after `vm move`, has the VM's raw disk but none of the
    metadata image this node made for it (it lies in this node's run directory). The disk's
    format is recorded with the VM, so its first bytes (the guest's) are never asked."""
    cluster = lv_cluster
    disk, secret, header = raw_disk_and_secret(tmp_path)
    cluster.cli("vm", "new", "raw", "--disk-path", str(disk), host=PRIMARY)
    vm_id = cluster.cli_json("vm", "get", "raw", host=PRIMARY)[0]["id"]
    cluster.cli("vm", "start", "raw", host=PRIMARY)
    cluster.cli("vm", "stop", "raw", "--force", host=PRIMARY)
    write_qcow2_header(disk, backing=secret, scratch=header)
    meta = cluster.hosts[PRIMARY].state_dir / "run" / vm_id[:8] / "meta"
    assert (meta / "disk0.qcow2").exists()
    shutil.rmtree(meta)  # what a node the VM moved to has
    cluster.cli("vm", "start", "raw", host=PRIMARY, check=False)
    assert not reads(cluster, PRIMARY, "raw", 0x5A, "1M", "1M")
    assert reads(cluster, PRIMARY, "raw", 0x00, "1M", "1M")


def test_an_old_database_records_a_raw_disk_as_raw_at_the_first_start(
    lv_cluster: Cluster, tmp_path: Path
) -> None:
    """A database from before formats were recorded (schema 9): the upgraded agent tells a raw
    disk's format once, by its metadata image (not by the qcow2 header its guest wrote since),
    and records it; the disk then stays raw where that image is gone (another node)."""
    cluster = lv_cluster
    disk, secret, header = raw_disk_and_secret(tmp_path)
    cluster.cli("vm", "new", "raw", "--disk-path", str(disk), host=PRIMARY)
    cluster.cli("vm", "new", "q", "--disk", "16M", host=PRIMARY)
    vm_id = cluster.cli_json("vm", "get", "raw", host=PRIMARY)[0]["id"]
    cluster.cli("vm", "start", "raw", host=PRIMARY)
    cluster.cli("vm", "stop", "raw", "--force", host=PRIMARY)
    write_qcow2_header(disk, backing=secret, scratch=header)
    cluster.stop(PRIMARY)
    db = cluster.hosts[PRIMARY].state_dir / "state.db"
    with sqlite3.connect(db) as conn:  # as the agent before formats left it
        conn.execute("ALTER TABLE vm_disks DROP COLUMN format")
        conn.execute("PRAGMA user_version=9")
    cluster.start(PRIMARY)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 10
        rows = conn.execute(
            "SELECT v.name, d.format FROM vm_disks d JOIN vms v ON v.id=d.vm_id ORDER BY v.name"
        ).fetchall()
    assert rows == [("q", "qcow2"), ("raw", "raw")]
    shutil.rmtree(cluster.hosts[PRIMARY].state_dir / "run" / vm_id[:8] / "meta")
    cluster.cli("vm", "start", "raw", host=PRIMARY, check=False)
    assert not reads(cluster, PRIMARY, "raw", 0x5A, "1M", "1M")
    assert reads(cluster, PRIMARY, "raw", 0x00, "1M", "1M")


DOMAIN = """<domain type='qemu'>
  <name>adopted</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def test_a_raw_disk_of_a_domain_adopted_from_virsh_stays_raw(
    lv_cluster: Cluster, tmp_path: Path
) -> None:
    """A domain defined with virsh says its disk is raw; its guest had written a qcow2 header
    at the start of that disk before the agent took the domain. The agent's first start goes by
    what the domain says, not by the disk's first bytes."""
    cluster = lv_cluster
    disk, secret, header = raw_disk_and_secret(tmp_path)
    write_qcow2_header(disk, backing=secret, scratch=header)
    xml = tmp_path / "adopted.xml"
    xml.write_text(DOMAIN.format(disk=disk))
    cluster.libvirt[PRIMARY].virsh("define", str(xml))
    names = [v["name"] for v in cluster.cli_json("vm", "list", host=PRIMARY)]
    assert "adopted" in names  # taken from libvirt
    cluster.cli("vm", "start", "adopted", host=PRIMARY)
    assert not reads(cluster, PRIMARY, "adopted", 0x5A, "1M", "1M")
    assert reads(cluster, PRIMARY, "adopted", 0x00, "1M", "1M")


def test_a_raw_disk_is_never_moved_into_a_replica_chain_by_a_reverse(
    lv_cluster: Cluster, tmp_path: Path
) -> None:
    """A reverse moves the old primary's disks into replica chains, whose images are qcow2: a
    raw disk there would be opened as qcow2, by its first bytes (the guest's), with a backing
    file of the guest's choosing. The old primary refuses the reverse in one line, and its VM
    and disk stay as they were."""
    cluster = lv_cluster
    pair = two_way(cluster)
    disk, secret, header = raw_disk_and_secret(tmp_path)
    cluster.cli("vm", "new", "raw", "--disk-path", str(disk), host=PRIMARY)
    cluster.cli("vm", "start", "raw", host=PRIMARY)
    pair.write("raw", 0, 0x11, "1M", "1M")
    pair.enable("raw")
    pair.start("raw")
    cluster.cli("vm", "stop", "raw", "--force", host=PRIMARY)
    write_qcow2_header(disk, backing=secret, scratch=header)
    cluster.cli("failover", "start", "raw", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "raw", host=REPLICA)
    refused = cluster.cli("replication", "set", "raw", "--reverse", host=REPLICA, check=False)
    assert refused.returncode == 4, refused.stderr
    assert "is raw" in one_line_error(refused.stderr), refused.stderr
    assert cluster.cli_json("vm", "get", "raw", host=PRIMARY)[0]["disks"] == [str(disk)]
    assert cluster.cli_json("replication", "get", "raw", host=PRIMARY)[0]["mode"] == "Primary"
    assert disk.exists()


def test_a_raw_disk_is_no_copy_to_start_a_replica_from(lv_cluster: Cluster, tmp_path: Path) -> None:
    """A copy to seed a replica from (`enable --as-replica`) becomes a replica chain's base,
    whose images are qcow2: a raw disk whose guest wrote a qcow2 header would pass for one."""
    cluster = lv_cluster
    disk, header = tmp_path / "disk.raw", tmp_path / "h.qcow2"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    cluster.cli("vm", "new", "seed", "--disk-path", str(disk), host=REPLICA)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(header), "16M"], check=True)
    with open(disk, "r+b") as f:  # what its guest can write: a qcow2 header, no backing file
        f.write(header.read_bytes())
    refused = cluster.cli("replication", "enable", "seed", "--as-replica", "--allowed-primary",
                          PRIMARY, host=REPLICA, check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "is raw: a copy to start from" in one_line_error(refused.stderr)
    assert cluster.cli("replication", "get", "seed", host=REPLICA, check=False).returncode == 3
