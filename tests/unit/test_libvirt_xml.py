"""The libvirt driver's pure parts: domain, checkpoint and backup XML, and host.toml's driver."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmreplica._internal.config import load_host_config, write_toml_atomic
from vmreplica._internal.drivers.libvirt import domain_xml
from vmreplica._internal.ports.hypervisor import VmSpec
from vmreplica.errors import InvalidArgument

UUID = "3edb707b-3c34-43f7-abc3-18a5b309a045"


def _spec(tmp_path: Path, **kw: object) -> VmSpec:
    disks = (tmp_path / "a.qcow2", tmp_path / "b.qcow2")
    for d in disks:
        d.write_bytes(b"QFI\xfb")
    base: dict[str, object] = {
        "id": UUID, "name": "app", "cpus": 2, "memory_mb": 256, "disks": disks,
        "run_dir": tmp_path / "run", "kernel": tmp_path / "vmlinuz", "initrd": None,
        "append": "console=ttyS0",
    }  # fmt: skip
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_targets() -> None:
    assert [domain_xml.target(i) for i in (0, 1, 25, 26, 27)] == [
        "vda", "vdb", "vdz", "vdaa", "vdab",
    ]  # fmt: skip


def test_domain_xml_round_trip(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    xml = domain_xml.domain_xml(spec, ["qcow2", "qcow2"])
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("uuid") == UUID and root.findtext("description") == "managed by vmreplica"
    assert root.find("./features/acpi") is not None  # `vm stop` presses the power button
    assert domain_xml.managed(xml)
    assert domain_xml.disk_sources(xml) == [("vda", spec.disks[0]), ("vdb", spec.disks[1])]
    back = domain_xml.spec_of(xml, Path("/r"), "tcg")
    assert (back.id, back.name, back.cpus, back.memory_mb) == (UUID, "app", 2, 256)
    assert back.disks == spec.disks and back.kernel == spec.kernel and back.initrd is None
    assert back.append == "console=ttyS0"
    with pytest.raises(InvalidArgument):
        domain_xml.domain_xml(_spec(tmp_path, accel="hvf"), ["qcow2", "qcow2"])


def test_with_disks_keeps_a_foreign_domain(tmp_path: Path) -> None:
    foreign = (
        "<domain type='kvm'><name>web</name><uuid>" + UUID + "</uuid>"
        "<memory unit='GiB'>2</memory><devices>"
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/vg/web'/><target dev='sda' bus='scsi'/></disk>"
        "<disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc'/></disk>"
        "<interface type='network'><source network='default'/></interface>"
        "</devices></domain>"
    )
    assert not domain_xml.managed(foreign)
    assert domain_xml.spec_of(foreign, Path("/r"), "kvm").memory_mb == 2048
    meta = tmp_path / "meta.qcow2"
    out = ET.fromstring(domain_xml.with_disks(foreign, [meta]))
    disk = out.find("./devices/disk")
    assert disk is not None and disk.get("type") == "file"
    assert disk.find("source") is not None and disk.find("source").get("file") == str(meta)  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert out.find("./devices/interface") is not None  # the rest stays
    assert out.find("./devices/disk[@device='cdrom']") is not None
    with pytest.raises(InvalidArgument):
        domain_xml.with_disks(foreign, [meta, meta])


def test_checkpoint_and_backup_xml() -> None:
    cp = ET.fromstring(domain_xml.checkpoint_xml("vmr-3", ["vda"], ["vda", "vdb"]))
    assert cp.findtext("name") == "vmr-3"
    assert [(d.get("name"), d.get("checkpoint")) for d in cp.iter("disk")] == [
        ("vda", "bitmap"), ("vdb", "no"),
    ]  # fmt: skip
    push = ET.fromstring(domain_xml.backup_xml(
        "push", ["vda"], ["vda", "vdb"], [Path("/d/disk0.qcow2")], incremental="vmr-3"
    ))  # fmt: skip
    assert push.get("mode") == "push" and push.findtext("incremental") == "vmr-3"
    assert push.find("./disks/disk/target").get("file") == "/d/disk0.qcow2"  # type: ignore[union-attr]
    assert push.find("./disks/disk[@name='vdb']").get("backup") == "no"  # type: ignore[union-attr]
    pull = ET.fromstring(domain_xml.backup_xml(
        "pull", ["vda"], ["vda"], [Path("/w/s.qcow2")], socket=Path("/w/b.sock")
    ))  # fmt: skip
    assert pull.find("server").get("socket") == "/w/b.sock"  # type: ignore[union-attr]
    assert pull.find("incremental") is None
    assert pull.find("./disks/disk/scratch").get("file") == "/w/s.qcow2"  # type: ignore[union-attr]


def test_host_toml_driver(tmp_path: Path) -> None:
    base = {
        "name": "h1.example.com", "state_dir": "/x", "mgmt_listen": "127.0.0.1:1",
        "tls": {"ca": "/c", "cert": "/c", "key": "/k"},
    }  # fmt: skip
    write_toml_atomic(tmp_path / "a.toml", base)
    default = load_host_config(tmp_path / "a.toml")
    assert (default.driver, default.libvirt_uri) == ("qemu", "qemu:///system")
    assert "driver" not in default.to_toml()
    write_toml_atomic(tmp_path / "b.toml", base | {"driver": "libvirt", "libvirt_uri": "qemu:///x"})
    chosen = load_host_config(tmp_path / "b.toml")
    assert (chosen.driver, chosen.libvirt_uri) == ("libvirt", "qemu:///x")
    write_toml_atomic(tmp_path / "c.toml", chosen.to_toml())
    assert load_host_config(tmp_path / "c.toml") == chosen
    write_toml_atomic(tmp_path / "d.toml", base | {"driver": "xen"})
    with pytest.raises(InvalidArgument, match="driver must be one of qemu, libvirt"):
        load_host_config(tmp_path / "d.toml")
