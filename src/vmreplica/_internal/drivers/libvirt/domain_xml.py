"""Domain XML from a VmSpec, and the few things read back from a domain's XML (pure).

A VM the agent runs under libvirt is a persistent domain of type ``qemu`` (TCG) or ``kvm``, with
the same machine as the QEMU driver gives it: q35, virtio disks ``vda``, ``vdb``… in the order of
the VM's disks, direct kernel boot when the VM has a kernel, the serial console in a file of the
VM's run directory, the guest agent's virtio-serial channel, no network interface.

Disk ``n`` of a VM is target ``vd`` + the n-th letter; a libvirt checkpoint and backup name disks
by that target. A regular file is a ``file`` disk, a block device (an LVM volume, an iSCSI LUN)
a ``block`` disk; the format is what the image says (qcow2, or raw).
"""

from __future__ import annotations

import stat
import string
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from vmreplica._internal.ports.hypervisor import VmSpec
from vmreplica.errors import InvalidArgument

DESCRIPTION = "managed by vmreplica"
SERIAL_LOG = "serial.log"


def target(index: int) -> str:
    """``vda`` … ``vdz``, then ``vdaa`` …, as libvirt and Linux name virtio disks."""
    letters = string.ascii_lowercase
    name = ""
    n = index
    while True:
        name = letters[n % 26] + name
        n = n // 26 - 1
        if n < 0:
            return "vd" + name


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    node = ET.SubElement(parent, tag, attrs)
    if text is not None:
        node.text = text
    return node


def disk_element(parent: ET.Element, path: Path, index: int, fmt: str) -> None:
    """One virtio disk; a block device is a ``block`` disk, anything else a ``file``."""
    try:
        block = stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        block = False
    disk = _sub(parent, "disk", type="block" if block else "file", device="disk")
    _sub(disk, "driver", name="qemu", type=fmt, discard="unmap")
    if block:
        _sub(disk, "source", dev=str(path.absolute()))
    else:
        _sub(disk, "source", file=str(path.absolute()))
    _sub(disk, "target", dev=target(index), bus="virtio")


def domain_xml(spec: VmSpec, formats: Sequence[str], description: str = DESCRIPTION) -> str:
    if spec.accel not in ("tcg", "kvm"):
        raise InvalidArgument(f"accelerator {spec.accel!r} is not tcg or kvm")
    dom = ET.Element("domain", type="qemu" if spec.accel == "tcg" else "kvm")
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.id)
    _sub(dom, "description", description)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    if spec.kernel is not None:
        _sub(os_, "kernel", str(spec.kernel.absolute()))
    if spec.initrd is not None:
        _sub(os_, "initrd", str(spec.initrd.absolute()))
    if spec.append is not None:
        _sub(os_, "cmdline", spec.append)
    features = _sub(dom, "features")
    _sub(features, "acpi")  # the power button: `vm stop` asks the guest to power off
    _sub(dom, "cpu", mode="maximum" if spec.accel == "tcg" else "host-passthrough")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    for i, (disk, fmt) in enumerate(zip(spec.disks, formats, strict=True)):
        disk_element(devices, disk, i, fmt)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.run_dir.absolute() / SERIAL_LOG), append="on")
    _sub(serial, "target", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def declared_raw(xml: str, disks: Sequence[Path]) -> frozenset[int]:
    """Which of ``disks`` the domain's XML opens itself, as raw: what its administrator said
    of the disk, which its first bytes (the guest's) cannot overrule."""
    elements = [d for d in ET.fromstring(xml).findall("./devices/disk")
                if d.get("device", "disk") == "disk"]  # fmt: skip
    out = set()
    for i, (element, disk) in enumerate(zip(elements, disks, strict=False)):
        src, driver = element.find("source"), element.find("driver")
        path = None if src is None else (src.get("file") or src.get("dev"))
        if driver is not None and driver.get("type") == "raw" and path == str(disk.absolute()):
            out.add(i)
    return frozenset(out)


def disk_sources(xml: str) -> list[tuple[str, Path]]:
    """(target, source path) of each disk of a domain's XML, in the domain's order."""
    return [(t, p) for t, p, _ in _disks(xml)]


def disk_formats(xml: str) -> tuple[str | None, ...]:
    """The format the domain's XML gives each disk (of disk_sources), None when it gives
    none this driver opens (raw, qcow2)."""
    return tuple(f if f in ("raw", "qcow2") else None for _, _, f in _disks(xml))


def _disks(xml: str) -> list[tuple[str, Path, str | None]]:
    out = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        tgt = disk.find("target")
        src = disk.find("source")
        if tgt is None or src is None:
            continue
        path = src.get("file") or src.get("dev")
        driver = disk.find("driver")
        if path:
            out.append(
                (str(tgt.get("dev")), Path(path), None if driver is None else driver.get("type"))
            )
    return out


def checkpoint_xml(name: str, disks: Sequence[str], all_disks: Sequence[str]) -> str:
    """A checkpoint with a bitmap on ``disks`` only (the replicated ones)."""
    cp = ET.Element("domaincheckpoint")
    _sub(cp, "name", name)
    listed = _sub(cp, "disks")
    for disk in all_disks:
        _sub(listed, "disk", name=disk, checkpoint="bitmap" if disk in disks else "no")
    return ET.tostring(cp, encoding="unicode")


def backup_xml(
    mode: str,
    disks: Sequence[str],
    all_disks: Sequence[str],
    files: Sequence[Path],
    incremental: str | None = None,
    socket: Path | None = None,
) -> str:
    """A backup of ``disks``: ``push`` into new qcow2 ``files``, or ``pull`` with ``files`` as
    the scratch (fleecing) images and an NBD server on the unix ``socket``."""
    b = ET.Element("domainbackup", mode=mode)
    if incremental is not None:
        _sub(b, "incremental", incremental)
    if mode == "pull":
        assert socket is not None
        _sub(b, "server", transport="unix", socket=str(socket))
    listed = _sub(b, "disks")
    by_disk = dict(zip(disks, files, strict=True))
    for disk in all_disks:
        if disk not in by_disk:
            _sub(listed, "disk", name=disk, backup="no")
            continue
        node = _sub(listed, "disk", name=disk, backup="yes", type="file")
        if mode == "push":
            _sub(node, "target", file=str(by_disk[disk]))
        else:
            _sub(node, "scratch", file=str(by_disk[disk]))
        _sub(node, "driver", type="qcow2")
    return ET.tostring(b, encoding="unicode")


def _text(root: ET.Element, path: str) -> str | None:
    node = root.find(path)
    return node.text if node is not None and node.text else None


def spec_of(xml: str, run_dir: Path, accel: str) -> VmSpec:
    """A domain's XML as a VmSpec: what the agent records of a domain it did not define."""
    root = ET.fromstring(xml)
    memory = root.find("memory")
    kib = int(memory.text or 0) if memory is not None else 0
    unit = (memory.get("unit") if memory is not None else None) or "KiB"
    scale = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1 << 20, "M": 1 << 20,
             "GiB": 1 << 30, "G": 1 << 30}.get(unit, 1024)  # fmt: skip
    kernel, initrd = _text(root, "./os/kernel"), _text(root, "./os/initrd")
    return VmSpec(
        id=str(_text(root, "uuid")), name=str(_text(root, "name")),
        cpus=int(_text(root, "vcpu") or 1), memory_mb=max(16, kib * scale >> 20),
        disks=tuple(p for _, p in disk_sources(xml)), run_dir=run_dir,
        kernel=Path(kernel) if kernel else None, initrd=Path(initrd) if initrd else None,
        append=_text(root, "./os/cmdline"), accel=accel, formats=disk_formats(xml),
    )  # fmt: skip


def managed(xml: str) -> bool:
    """Whether vmreplica generated the domain (its description says so)."""
    return _text(ET.fromstring(xml), "description") == DESCRIPTION


def with_disks(xml: str, disks: Sequence[Path]) -> str:
    """The domain's own XML, its disks (in order) pointed at ``disks``, opened as qcow2: a
    domain someone else defined keeps everything else (interfaces, graphics, …)."""
    root = ET.fromstring(xml)
    elements = [d for d in root.findall("./devices/disk") if d.get("device", "disk") == "disk"]
    if len(elements) != len(disks):
        raise InvalidArgument(f"the domain has {len(elements)} disks, not {len(disks)}")
    for disk, path in zip(elements, disks, strict=True):
        try:
            block = stat.S_ISBLK(path.stat().st_mode)
        except OSError:
            block = False
        disk.set("type", "block" if block else "file")
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        for key in ("file", "dev"):
            source.attrib.pop(key, None)
        source.set("dev" if block else "file", str(path.absolute()))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", "qcow2")
    return ET.tostring(root, encoding="unicode")
