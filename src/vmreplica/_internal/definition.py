"""A primary's libvirt domain XML turned into its replica's (pure; no libvirt here).

A libvirt primary sends its domain's XML with ``enable``; the replica keeps it beside the
chains and, after a failover, defines its domain from it: the same name and UUID, interfaces,
graphics, controllers, description and everything else the administrator gave the domain, but
with the replica host's own emulator, the disks on the replica's images, serial logs in the
replica VM's run directory, the kernel and initrd the replica copied, and a ``<metadata>``
element saying vmreplica manages it as a replica. A test failover's domain ("NAME - Test") gets
its own name and UUID, new MAC addresses, and every interface's link down.

The XML comes from another host: it is parsed with expat first, and a document over
:data:`MAX_DEFINITION` or with a DOCTYPE (so any entity) is refused. Devices that belong to the
primary host (passed-through PCI/USB devices, shared folders, a TPM's state…) are refused, with
the device named, rather than silently dropped. So is anything that would have the replica host
open, run or write one of its own files for the guest (:func:`_host_paths`): a path outside the
few places this module rewrites (disks, chardev files, kernel and initrd), QEMU arguments
(``qemu:commandline`` or any element of another namespace outside ``<metadata>``), an
interface that passes a host device through, or a ``<seclabel>`` that turns confinement off.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from xml.parsers import expat

from vmreplica.errors import InvalidArgument

MAX_DEFINITION = 256 << 10  # bytes of XML
FILE_NAME = "vmreplica-domain.xml"  # in the replica VM's storage directory
MARK = "replica managed by vmreplica"
NAMESPACE = "https://vmreplica.invalid/xmlns/replica/1"
GENERATED = "managed by vmreplica"  # the description of a domain vmreplica generated
SERIAL_LOG = "serial.log"

# Devices a replica may have. Anything else is the primary host's own: refused.
ALLOWED_DEVICES = frozenset(
    {
        "disk", "controller", "interface", "input", "graphics", "video", "sound", "audio",
        "console", "serial", "parallel", "channel", "rng", "memballoon", "watchdog", "panic",
        "redirdev", "hub", "iommu", "vsock", "memory",
    }
)  # fmt: skip
DROPPED_DEVICES = frozenset({"emulator"})  # the replica host's own is used
CHARDEVS = ("serial", "console", "parallel", "channel")

ET.register_namespace("vmreplica", NAMESPACE)


@dataclass(frozen=True)
class ReplicaDomain:
    """What the replica host puts into the domain it defines from the primary's XML."""

    name: str
    uuid: str
    disks: tuple[Path, ...]  # the replica VM's images, in the order of the domain's disks
    run_dir: Path
    accel: str = "tcg"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    test: bool = False  # a test failover's domain: new MACs, links down


def _refuse(_: object, *__: object) -> NoReturn:
    raise InvalidArgument("domain XML with a DOCTYPE or entities is refused")


def parse(xml: str) -> ET.Element:
    """The ``<domain>`` element of untrusted XML: capped, no DOCTYPE, no entities."""
    data = xml.encode("utf-8", errors="replace")
    if len(data) > MAX_DEFINITION:
        raise InvalidArgument(
            f"domain XML is {len(data)} bytes, over the limit of {MAX_DEFINITION} bytes"
        )
    checker = expat.ParserCreate()
    checker.StartDoctypeDeclHandler = _refuse
    checker.EntityDeclHandler = _refuse
    checker.ExternalEntityRefHandler = _refuse
    checker.SkippedEntityHandler = _refuse
    try:
        checker.Parse(data, True)
        root = ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError) as e:
        raise InvalidArgument(f"domain XML is not well-formed: {e}") from None
    if root.tag != "domain":
        raise InvalidArgument(f"domain XML has <{root.tag}> at its root, not <domain>")
    return root


def _disks(devices: ET.Element | None) -> list[ET.Element]:
    if devices is None:
        return []
    return [d for d in devices.findall("disk") if d.get("device", "disk") == "disk"]


def check(xml: str, vm_id: str | None = None, disks: int | None = None) -> ET.Element:
    """Refuse what a replica could not be defined from; the parsed root otherwise."""
    root = parse(xml)
    uuid = (root.findtext("uuid") or "").strip().lower()
    if vm_id is not None and uuid != vm_id.lower():
        raise InvalidArgument(f"domain XML has UUID {uuid or '(none)'!r}, not the VM's {vm_id}")
    devices = root.find("devices")
    for dev in list(devices) if devices is not None else []:
        tag = str(dev.tag)
        if tag not in ALLOWED_DEVICES and tag not in DROPPED_DEVICES:
            raise InvalidArgument(
                f"the domain has a <{tag}> device, which belongs to its host and cannot be "
                "replicated: remove it from the domain first"
            )
        if tag == "disk" and dev.get("device", "disk") not in ("disk", "cdrom", "floppy"):
            raise InvalidArgument(
                f"the domain has a disk with device={dev.get('device')!r} (passed through): "
                "it cannot be replicated"
            )
    _host_paths(root)
    found = len(_disks(devices))
    if disks is not None and found != disks:
        raise InvalidArgument(f"domain XML has {found} disks, not the VM's {disks}")
    return root


FIRMWARE_DIR = "/usr/share/"  # a loader must be firmware the replica host installed there
RANDOM_SOURCES = frozenset({"/dev/random", "/dev/urandom", "/dev/hwrng"})
# Paths replaced or dropped when the replica's domain is made (replica_domain).
_REWRITTEN_OS = frozenset({"kernel", "initrd", "nvram", "cmdline"})
_FREE_TEXT = frozenset({"description", "title", "metadata"})


def _host_paths(root: ET.Element) -> None:
    """Refuse what would give the guest, or the primary's administrator, one of the replica
    host's files or devices: the XML names them as absolute paths, QEMU arguments, a host
    interface passed through, or confinement turned off."""
    exempt: set[int] = set()  # ids of elements whose paths are rewritten or checked here
    for child in root:
        if isinstance(child.tag, str) and child.tag.startswith("{"):
            raise InvalidArgument(
                f"the domain has {child.tag.split('}')[1]!r} of namespace "
                f"{child.tag[1:].split('}')[0]} (QEMU arguments or hypervisor overrides): such "
                "settings of the primary host cannot be replicated"
            )
        if child.tag == "seclabel" and child.get("type", "dynamic") != "dynamic":
            raise InvalidArgument(
                f"the domain has a <seclabel type={child.get('type')!r}>: a replica runs confined"
            )
        if child.tag in ("seclabel", "resource", "blkiotune"):  # labels, cgroups: no files
            exempt.update(id(n) for n in child.iter())
    os_ = root.find("os")
    devices = root.find("devices")
    for node in [] if os_ is None else [n for n in os_ if n.tag in _REWRITTEN_OS]:
        exempt.add(id(node))
    for loader in [] if os_ is None else os_.findall("loader"):
        path = (loader.text or "").strip()
        if path and (not path.startswith(FIRMWARE_DIR) or os.path.normpath(path) != path):
            raise InvalidArgument(
                f"the domain's loader {path!r} is not firmware under {FIRMWARE_DIR}"
            )
        exempt.add(id(loader))
    for dev in [] if devices is None else list(devices):
        if dev.tag in ("disk", "emulator"):
            exempt.update(id(n) for n in dev.iter())
        elif dev.tag in CHARDEVS and dev.get("type") in ("file", "unix"):
            exempt.update(id(n) for n in dev.findall("source"))
        elif dev.tag == "interface" and dev.get("type") in ("hostdev", "vhostuser"):
            raise InvalidArgument(
                f"the domain has an interface of type {dev.get('type')!r}, which belongs to its "
                "host and cannot be replicated"
            )
        elif dev.tag == "interface":
            for rom in dev.findall("rom"):  # an option ROM is read into the guest
                path = rom.get("file", "")
                if path and (not path.startswith(FIRMWARE_DIR) or os.path.normpath(path) != path):
                    raise InvalidArgument(
                        f"the domain's option ROM {path!r} is not firmware under {FIRMWARE_DIR}"
                    )
                exempt.add(id(rom))
        elif dev.tag == "rng":
            for backend in dev.findall("backend"):
                if backend.get("model") == "random" and backend.text:
                    if backend.text.strip() not in RANDOM_SOURCES:
                        raise InvalidArgument(
                            f"the domain's random number source {backend.text.strip()!r} is "
                            f"not one of {', '.join(sorted(RANDOM_SOURCES))}"
                        )
                    exempt.add(id(backend))
    for node in _outside_free_text(root):
        if id(node) in exempt:
            continue
        values = [(f"{k}=", v) for k, v in node.attrib.items()] + [("", node.text or "")]
        for key, value in values:
            if value.strip().startswith("/"):
                raise InvalidArgument(
                    f"the domain's <{node.tag}> names {key}{value.strip()!r}, a path of its "
                    "host: a replica host's files are not the guest's to open, run or write"
                )


def _outside_free_text(root: ET.Element) -> list[ET.Element]:
    """Every element but those whose content is only words (description, metadata)."""
    out, todo = [], [root]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(c for c in node if isinstance(c.tag, str) and c.tag not in _FREE_TEXT)
    return out


def only_disks(xml: str, keep: Sequence[int]) -> str:
    """The primary's XML with only the disks at positions ``keep`` (the replicated ones)."""
    root = parse(xml)
    devices = root.find("devices")
    for n, disk in enumerate(_disks(devices)):
        if n not in keep:
            assert devices is not None
            devices.remove(disk)
    return ET.tostring(root, encoding="unicode")


def _set_disk(disk: ET.Element, path: Path, block: bool) -> None:
    for child in ("source", "backingStore", "auth", "mirror", "encryption"):
        for node in disk.findall(child):
            disk.remove(node)
    disk.set("type", "block" if block else "file")
    source = ET.Element("source", {"dev" if block else "file": str(path.absolute())})
    disk.insert(0, source)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("name", "qemu")
    driver.set("type", "qcow2")


def _empty_drive(disk: ET.Element) -> None:
    """A CD-ROM or floppy keeps its drive, not the primary host's medium."""
    for child in ("source", "backingStore", "auth"):
        for node in disk.findall(child):
            disk.remove(node)
    disk.set("type", "file")


def _chardevs(devices: ET.Element, run_dir: Path) -> None:
    """Files in the primary's paths become files of the replica VM's run directory; a unix
    socket's path is left for libvirt to choose."""
    renamed: dict[str, str] = {}
    for tag in CHARDEVS:
        for dev in devices.findall(tag):
            source = dev.find("source")
            if source is None:
                continue
            if dev.get("type") == "file" and source.get("path"):
                old = str(source.get("path"))
                if old not in renamed:
                    name = SERIAL_LOG if not renamed else f"chardev{len(renamed)}.log"
                    renamed[old] = str(run_dir.absolute() / name)
                source.set("path", renamed[old])
            elif dev.get("type") == "unix":
                source.attrib.pop("path", None)


def _boot(root: ET.Element, want: ReplicaDomain) -> None:
    os_ = root.find("os")
    if os_ is None:
        return
    for nvram in os_.findall("nvram"):  # the primary host's per-domain file
        os_.remove(nvram)
    for tag, value in (("kernel", want.kernel), ("initrd", want.initrd), ("cmdline", want.append)):
        found = os_.find(tag)
        if found is not None:
            os_.remove(found)
        if value is not None:
            ET.SubElement(os_, tag).text = (
                str(value.absolute()) if isinstance(value, Path) else value
            )


def _mark(root: ET.Element) -> None:
    description = root.find("description")
    if description is None:
        description = ET.Element("description")
        root.insert(2, description)
    text = description.text or ""
    if text == GENERATED or not text:
        description.text = MARK
    elif MARK not in text:
        description.text = f"{text}\n({MARK})"
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{NAMESPACE}}}replica"):
        metadata.remove(old)
    ET.SubElement(metadata, f"{{{NAMESPACE}}}replica").text = MARK


def replica_domain(xml: str, want: ReplicaDomain, block: Sequence[bool] = ()) -> str:
    """The domain the replica host defines from the primary's ``xml`` (pure). ``block[n]``:
    whether disk ``n`` is a block device."""
    root = check(xml, disks=len(want.disks))
    root.set("type", "qemu" if want.accel == "tcg" else "kvm")
    for tag, value in (("name", want.name), ("uuid", want.uuid)):
        node = root.find(tag)
        if node is None:
            node = ET.Element(tag)
            root.insert(0, node)
        node.text = value
    root.attrib.pop("id", None)  # a running domain's number on the primary
    cpu = root.find("cpu")
    if want.accel == "tcg" and cpu is not None and cpu.get("mode", "").startswith("host-"):
        cpu.set("mode", "maximum")  # TCG has no host CPU to pass through
    _boot(root, want)
    _mark(root)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for tag in DROPPED_DEVICES:
        for node in devices.findall(tag):
            devices.remove(node)
    for n, (disk, path) in enumerate(zip(_disks(devices), want.disks, strict=True)):
        _set_disk(disk, path, n < len(block) and block[n])
    for disk in devices.findall("disk"):
        if disk.get("device", "disk") != "disk":
            _empty_drive(disk)
    _chardevs(devices, want.run_dir)
    for iface in devices.findall("interface"):
        for node in iface.findall("target"):  # the primary's tap device name
            iface.remove(node)
        if want.test:
            for node in iface.findall("mac"):  # libvirt gives the test VM its own
                iface.remove(node)
            for node in iface.findall("link"):
                iface.remove(node)
            ET.SubElement(iface, "link", state="down")
    return ET.tostring(root, encoding="unicode")
