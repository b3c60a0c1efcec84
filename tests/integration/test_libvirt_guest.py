"""A domain someone defined with `virsh define` from plain XML, running the real test guest
(tests/guest.py: CRC-checked records, each fdatasync-ed), is taken by the agent as its VM,
replicated, failed over with a clean e2fsck and every record it wrote, and failed back."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import guest
from tests.integration import test_failover
from tests.integration.conftest import driver_cluster
from tests.integration.replication_env import PRIMARY, REPLICA, wait_for
from tests.localcluster import Cluster

GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()

DOMAIN = """<domain type='qemu'>
  <name>guest1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


@pytest.fixture
def lv_cluster() -> Iterator[Cluster]:
    with driver_cluster("libvirt") as c:
        yield c


def test_virsh_defined_domain_fails_over_and_back(lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair = test_failover.two_way(cluster)
    assets = guest.build_guest_assets(GUEST_CACHE)
    data = cluster.base / "guest1-data.qcow2"
    guest.make_data_disk(data, 64)
    serial = cluster.base / "guest1-serial.log"
    xml = cluster.base / "guest1.xml"
    xml.write_text(DOMAIN.format(kernel=assets.kernel, initrd=assets.initrd,
                                 cmdline=guest.kernel_cmdline(), disk=data, serial=serial))  # fmt: skip
    libvirt = cluster.libvirt[PRIMARY]
    libvirt.virsh("define", str(xml))
    libvirt.virsh("start", "guest1")  # started outside the agent, as an administrator would
    uuid = libvirt.virsh("domuuid", "guest1").stdout.strip()

    vms = {v["name"]: v for v in cluster.cli_json("vm", "list", host=PRIMARY)}
    assert vms["guest1"]["id"] == uuid and vms["guest1"]["state"] == "Running"
    assert vms["guest1"]["disks"] == [str(data)]
    wait_for(
        lambda: serial.exists() and "vmr: records:" in serial.read_text(errors="replace"),
        90,
        "the guest's first records",
    )
    pair.enable("guest1")
    pair.start("guest1")
    for _ in range(2):
        cluster.cli("replication", "sync", "guest1", host=PRIMARY)

    # Planned failover: the guest powers off (ACPI, through libvirt), every record it wrote
    # arrives, on a file system that checks clean.
    cluster.cli("vm", "stop", "guest1", host=PRIMARY)
    written = guest.verify_records(data)
    assert written.fsck_clean and not written.errors and written.count > 0
    cluster.cli("failover", "start", "guest1", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "guest1", host=REPLICA)
    overlay = pair.storage / "guest1" / "failover" / "disk0.qcow2"
    arrived = guest.verify_records(overlay)
    assert arrived.fsck_clean and not arrived.errors, arrived.details
    assert (arrived.count, arrived.last_seq) == (written.count, written.last_seq), "no data loss"

    # The replica runs it as a libvirt domain of its own, with the primary's UUID.
    cluster.cli("replication", "set", "guest1", "--reverse", host=REPLICA)
    cluster.cli("vm", "start", "guest1", host=REPLICA)
    assert cluster.libvirt[REPLICA].virsh("domuuid", "guest1").stdout.strip() == uuid
    replica_serial = next(
        p / "serial.log"
        for p in (cluster.hosts[REPLICA].state_dir / "run").iterdir()
        if (p / "serial.log").exists()
    )
    wait_for(lambda: "vmr: records:" in replica_serial.read_text(errors="replace"), 90, "records")
    cluster.cli("replication", "sync", "guest1", host=REPLICA)

    # Fail back: the records the replica's run added come home, the prefix unbroken.
    cluster.cli("vm", "stop", "guest1", host=REPLICA)
    continued = guest.verify_records(overlay)
    assert continued.fsck_clean and not continued.errors and continued.count > written.count
    cluster.cli("failover", "start", "guest1", "--prepare", host=REPLICA)
    cluster.cli("failover", "start", "guest1", host=PRIMARY)
    cluster.cli("replication", "set", "guest1", "--reverse", host=PRIMARY)
    home = [p for p in cluster.cli_json("vm", "get", "guest1", host=PRIMARY)[0]["disks"]]
    back = guest.verify_records(Path(home[0]), force_share=True)
    assert back.fsck_clean and not back.errors
    assert (back.count, back.last_seq) == (continued.count, continued.last_seq)
    subprocess.run(["sync"], check=False)
