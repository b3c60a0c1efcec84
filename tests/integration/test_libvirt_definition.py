"""The replica's domain is defined from the primary's own domain XML: a domain made with
`virsh define`, with a description and a network interface of its own, replicates; its test
failover is a domain "NAME - Test" with its interfaces' links down, and its failover a domain
with the primary's UUID, description and interface, on the replica's images."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import test_failover
from tests.integration.conftest import driver_cluster
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    restart_with_faults,
    verified_equal,
)
from tests.localcluster import Cluster
from vmreplica._internal import definition

MAC = "52:54:00:5e:00:42"
DESCRIPTION = "the shop's web server"
DOMAIN = f"""<domain type='qemu'>
  <name>web</name>
  <description>{DESCRIPTION}</description>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{{disk}}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='{MAC}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{{serial}}'/><target port='0'/></serial>
  </devices>
</domain>
"""


@pytest.fixture
def lv_cluster() -> Iterator[Cluster]:
    with driver_cluster("libvirt") as c:
        yield c


def _domain(cluster: Cluster, host: str, name: str) -> ET.Element:
    return ET.fromstring(cluster.libvirt[host].virsh("dumpxml", "--inactive", name).stdout)


def _defined_web(cluster: Cluster) -> tuple[Pair, Path]:
    """Both hosts replicate to each other, and PRIMARY's libvirtd has the domain `web` defined
    with `virsh define` (DOMAIN), on a new 64 MiB disk: the pair and the disk."""
    pair = test_failover.two_way(cluster)
    disk = cluster.base / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    xml = cluster.base / "web.xml"
    xml.write_text(DOMAIN.format(disk=disk, serial=cluster.base / "web-serial.log"))
    cluster.libvirt[PRIMARY].virsh("define", str(xml))
    return pair, disk


def _disk_source(root: ET.Element) -> Path:
    source = root.find("./devices/disk/source")
    assert source is not None
    return Path(str(source.get("file")))


def test_replica_domain_is_defined_from_the_primary_s(lv_cluster: Cluster) -> None:
    cluster = lv_cluster
    pair, _ = _defined_web(cluster)
    uuid = cluster.libvirt[PRIMARY].virsh("domuuid", "web").stdout.strip()
    assert [v["id"] for v in cluster.cli_json("vm", "list", host=PRIMARY)] == [uuid]
    cluster.cli("vm", "start", "web", host=PRIMARY)
    pair.write("web", 0, 0x11, "0", "1M")
    pair.enable("web")
    pair.start("web")
    pair.write("web", 0, 0x22, "1M", "1M")
    cluster.cli("replication", "sync", "web", host=PRIMARY)
    verified_equal(pair, "web")
    kept = ET.fromstring((pair.storage / "web" / definition.FILE_NAME).read_text())
    assert kept.findtext("uuid") == uuid and kept.find("./devices/interface") is not None
    refused = cluster.libvirt[REPLICA].virsh("start", "web", check=False)
    assert refused.returncode != 0  # no domain until a failover

    # Test failover: "web - Test", its own UUID and MAC, its link down, on the test overlay.
    cluster.cli("failover", "start", "web", "--as-test", host=REPLICA)
    cluster.cli("vm", "start", "web - Test", host=REPLICA)
    test = _domain(cluster, REPLICA, "web - Test")
    assert test.findtext("uuid") not in (None, uuid)
    iface = test.find("./devices/interface")
    assert iface is not None and iface.get("type") == "user"
    link = iface.find("link")
    assert link is not None and link.get("state") == "down"
    mac = iface.find("mac")
    assert mac is not None and mac.get("address") != MAC
    assert _disk_source(test).parent == pair.storage / "web" / "test"
    assert str(test.findtext("description")).startswith(DESCRIPTION)
    live = cluster.libvirt[REPLICA].virsh("domif-getlink", "web - Test", str(mac.get("address")))
    assert "down" in live.stdout, live.stdout  # as the running QEMU has it
    cluster.cli("failover", "stop", "web", host=REPLICA)
    names = cluster.libvirt[REPLICA].virsh("list", "--all", "--name").stdout.split("\n")
    assert "web - Test" not in [n.strip() for n in names]

    # Planned failover: the primary's UUID, description and interface, on the replica's chain.
    cluster.cli("vm", "stop", "web", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "web", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "web", host=REPLICA)
    cluster.cli("replication", "set", "web", "--reverse", host=REPLICA)
    cluster.cli("vm", "start", "web", host=REPLICA)
    failed_over = _domain(cluster, REPLICA, "web")
    assert failed_over.findtext("uuid") == uuid
    assert failed_over.findtext("description") == f"{DESCRIPTION}\n({definition.MARK})"
    assert failed_over.find(f"./metadata/{{{definition.NAMESPACE}}}replica") is not None
    iface = failed_over.find("./devices/interface")
    assert iface is not None and iface.get("type") == "user"
    assert iface.find("mac").get("address") == MAC  # type: ignore[union-attr]
    assert iface.find("link") is None or iface.find("link").get("state") != "down"  # type: ignore[union-attr]
    assert _disk_source(failed_over).parent == pair.storage / "web" / "failover"
    serial = failed_over.find("./devices/serial/source")
    assert serial is not None
    assert str(serial.get("path")).startswith(str(cluster.hosts[REPLICA].state_dir))
    assert test_failover.reads(cluster, REPLICA, "web", 0x11, "0", "1M")
    assert test_failover.reads(cluster, REPLICA, "web", 0x22, "1M", "1M")

    # Fail back: the old primary kept its own XML when it became the replica; its domain is
    # defined from that again, not generated from the VM's record.
    cluster.cli("vm", "stop", "web", "--force", host=REPLICA)
    cluster.cli("failover", "start", "web", "--prepare", host=REPLICA)
    cluster.cli("failover", "start", "web", host=PRIMARY)
    cluster.cli("replication", "set", "web", "--reverse", host=PRIMARY)
    cluster.cli("vm", "start", "web", host=PRIMARY)
    home = _domain(cluster, PRIMARY, "web")
    assert home.findtext("uuid") == uuid
    assert str(home.findtext("description")).startswith(DESCRIPTION)
    iface = home.find("./devices/interface")
    assert iface is not None and iface.find("mac").get("address") == MAC  # type: ignore[union-attr]
    assert test_failover.reads(cluster, PRIMARY, "web", 0x22, "1M", "1M")


@pytest.mark.parametrize("fault", ["error", "kill"])
def test_a_reverse_that_fails_moving_the_disks_keeps_the_old_primary_s_domain(
    lv_cluster: Cluster, fault: str
) -> None:
    """The old primary undefines its domain before its disks move into replica chains; a move
    that fails after that (here an injected error once they moved, or a kill -9 there, rolled
    back at the restart) moves the disks back and defines the domain again from its own XML,
    so the VM is still the virsh-defined one."""
    cluster = lv_cluster
    pair, disk = _defined_web(cluster)
    cluster.cli("vm", "start", "web", host=PRIMARY)
    pair.enable("web")
    pair.start("web")
    cluster.cli("vm", "stop", "web", "--force", host=PRIMARY)
    cluster.cli("failover", "start", "web", "--prepare", host=PRIMARY)
    cluster.cli("failover", "start", "web", host=REPLICA)
    restart_with_faults(cluster, PRIMARY, f"reverse.after_convert={fault}")
    failed = cluster.cli("replication", "set", "web", "--reverse", host=REPLICA, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
    if fault == "kill":
        process = cluster.hosts[PRIMARY].process
        assert process is not None and process.wait(10) == -9
        cluster.hosts[PRIMARY].process = None
        cluster.start(PRIMARY)  # its start-up recovery moves the disks back
    assert cluster.cli_json("replication", "get", "web", host=PRIMARY)[0]["mode"] == "Primary"
    home = _domain(cluster, PRIMARY, "web")
    assert str(home.findtext("description")).startswith(DESCRIPTION)
    iface = home.find("./devices/interface")
    assert iface is not None and iface.find("mac").get("address") == MAC  # type: ignore[union-attr]
    assert _disk_source(home) == disk
