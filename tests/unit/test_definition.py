"""The primary's domain XML turned into its replica's (definition.py), hostile inputs included,
and the ``definition`` field of an enable request."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmreplica._internal import definition
from vmreplica._internal.transport import protocol as p
from vmreplica.errors import InvalidArgument

UUID = "3edb707b-3c34-43f7-abc3-18a5b309a045"
TEST_UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"

PRIMARY = f"""<domain type='kvm' id='7'>
  <name>web</name>
  <uuid>{UUID}</uuid>
  <description>the shop's web server</description>
  <metadata><app xmlns='urn:example'>keep me</app></metadata>
  <memory unit='GiB'>2</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
    <kernel>/primary/boot/vmlinuz</kernel>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <cpu mode='host-passthrough'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web'/>
      <target dev='sda' bus='scsi'/>
      <boot order='1'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='admin'><secret type='ceph' usage='x'/></auth>
      <source protocol='rbd' name='pool/data'><host name='ceph1' port='6789'/></source>
      <backingStore/>
      <target dev='sdb' bus='scsi'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/debian.iso'/>
      <target dev='sdc' bus='sata'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:12:34:56'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/primary/run/web/serial.log'/><target port='0'/></serial>
    <console type='file'><source path='/primary/run/web/serial.log'/><target type='serial'/></console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <video><model type='virtio'/></video>
  </devices>
</domain>"""


def _want(tmp_path: Path, **kw: object) -> definition.ReplicaDomain:
    base: dict[str, object] = {
        "name": "web", "uuid": UUID,
        "disks": (tmp_path / "c0" / "disk0.qcow2", tmp_path / "c1" / "disk1.qcow2"),
        "run_dir": tmp_path / "run", "kernel": tmp_path / "boot" / "kernel",
        "append": "console=ttyS0",
    }  # fmt: skip
    base.update(kw)
    return definition.ReplicaDomain(**base)  # type: ignore[arg-type]


def test_failover_domain_keeps_the_primary_s_xml(tmp_path: Path) -> None:
    want = _want(tmp_path)
    root = ET.fromstring(definition.replica_domain(PRIMARY, want))
    assert root.findtext("name") == "web" and root.findtext("uuid") == UUID
    assert root.get("type") == "qemu" and root.get("id") is None  # TCG here, not a live id
    assert root.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    assert root.findtext("description") == f"the shop's web server\n({definition.MARK})"
    mark = root.find(f"./metadata/{{{definition.NAMESPACE}}}replica")
    assert mark is not None and mark.text == definition.MARK
    assert root.find("./metadata/{urn:example}app") is not None
    assert root.find("./devices/emulator") is None  # the replica host's own
    assert root.find("./os/nvram") is None and root.find("./os/loader") is not None
    assert root.findtext("./os/kernel") == str(want.kernel)
    assert root.find("./os/initrd") is None
    disks = root.findall("./devices/disk")
    for disk, path, target in zip(disks, want.disks, ("sda", "sdb"), strict=False):
        assert disk.get("type") == "file"
        assert disk.find("source").attrib == {"file": str(path)}  # type: ignore[union-attr]
        assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert disk.find("driver").get("cache") in ("none", None)  # type: ignore[union-attr]
        assert disk.find("target").get("dev") == target  # type: ignore[union-attr]
        assert disk.find("auth") is None and disk.find("backingStore") is None
    assert disks[0].find("boot") is not None
    assert disks[2].get("device") == "cdrom" and disks[2].find("source") is None
    iface = root.find("./devices/interface")
    assert iface is not None and iface.find("target") is None and iface.find("link") is None
    assert iface.find("mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    log = str(want.run_dir / "serial.log")
    assert root.find("./devices/serial/source").get("path") == log  # type: ignore[union-attr]
    assert root.find("./devices/console/source").get("path") == log  # type: ignore[union-attr]
    assert root.find("./devices/channel/source").get("path") is None  # type: ignore[union-attr]
    assert root.find("./devices/graphics") is not None and root.find("./devices/video") is not None
    # Defined again from its own output (a reverse and a failback): one mark, not two.
    again = ET.fromstring(definition.replica_domain(ET.tostring(root, "unicode"), want))
    assert again.findtext("description") == root.findtext("description")
    assert len(again.findall(f"./metadata/{{{definition.NAMESPACE}}}replica")) == 1


def test_test_domain_has_its_links_down(tmp_path: Path) -> None:
    want = _want(tmp_path, name="web - Test", uuid=TEST_UUID, test=True, kernel=None)
    root = ET.fromstring(definition.replica_domain(PRIMARY, want))
    assert (root.findtext("name"), root.findtext("uuid")) == ("web - Test", TEST_UUID)
    iface = root.find("./devices/interface")
    assert iface is not None and iface.find("mac") is None  # libvirt gives it a MAC of its own
    assert [link.get("state") for link in iface.findall("link")] == ["down"]
    assert root.find("./os/kernel") is None


def test_generated_description_becomes_the_replica_s(tmp_path: Path) -> None:
    xml = PRIMARY.replace("the shop's web server", definition.GENERATED)
    root = ET.fromstring(definition.replica_domain(xml, _want(tmp_path)))
    assert root.findtext("description") == definition.MARK
    bare = PRIMARY.replace("<description>the shop's web server</description>", "")
    root = ET.fromstring(definition.replica_domain(bare, _want(tmp_path)))
    assert root.findtext("description") == definition.MARK


def test_only_the_replicated_disks_travel() -> None:
    kept = definition.only_disks(PRIMARY, [1])
    root = ET.fromstring(kept)
    assert [d.find("target").get("dev") for d in root.findall("./devices/disk")] == ["sdb", "sdc"]  # type: ignore[union-attr]
    definition.check(kept, UUID, 1)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<domain><name>&lol2;</name></domain>"""
EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain><name>&x;</name></domain>"""


def _device(xml: str) -> str:
    return PRIMARY.replace("<video>", xml + "<video>")


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        # QEMU's own arguments: anything at all on the replica host.
        (
            PRIMARY.replace(
                "<vcpu>",
                f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg "
                "value='-drive'/><qemu:arg value='file=/etc/shadow,if=virtio'/>"
                "</qemu:commandline><vcpu>",
            ),
            "QEMU arguments",
        ),
        (
            PRIMARY.replace("<vcpu>", f"<qemu:override xmlns:qemu='{QEMU_NS}'/><vcpu>"),
            "QEMU arguments",
        ),
        # A host file given to the guest: as firmware, NVDIMM, fw_cfg entry, device tree.
        (PRIMARY.replace("/usr/share/OVMF/OVMF_CODE.fd", "/etc/shadow"), "not firmware"),
        (
            PRIMARY.replace("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/../../etc/shadow"),
            "not firmware",
        ),
        (
            _device(
                "<memory model='nvdimm'><source><path>/etc/shadow</path></source>"
                "<target><size unit='KiB'>4</size></target></memory>"
            ),
            "'/etc/shadow'",
        ),
        (
            PRIMARY.replace(
                "<vcpu>",
                "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo><vcpu>",
            ),
            "file='/etc/shadow'",
        ),
        (PRIMARY.replace("</os>", "<dtb>/etc/shadow</dtb></os>"), "'/etc/shadow'"),
        # A host device or file opened as a character device, an input, a random source.
        (
            _device("<serial type='dev'><source path='/dev/sda'/><target port='1'/></serial>"),
            "path='/dev/sda'",
        ),
        (_device("<channel type='pipe'><source path='/root/fifo'/></channel>"), "/root/fifo"),
        (
            PRIMARY.replace(
                "<target port='0'/></serial>",
                "<log file='/etc/cron.d/x'/><target port='0'/></serial>",
            ),
            "/etc/cron.d",
        ),
        (_device("<input type='evdev'><source dev='/dev/input/event0'/></input>"), "event0"),
        (
            _device("<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>"),
            "random number source",
        ),
        # A host file written by QEMU; a socket made at a host path.
        (_device("<audio id='1' type='file' path='/etc/passwd'/>"), "path='/etc/passwd'"),
        (
            PRIMARY.replace(
                "<graphics type='vnc' port='-1' autoport='yes'/>",
                "<graphics type='vnc' socket='/run/x.sock'/>",
            ),
            "socket=",
        ),
        (PRIMARY.replace("<target dev='vnet3'/>", "<rom file='/etc/shadow'/>"), "option ROM"),
        # A host network device passed through; confinement turned off.
        (
            _device(
                "<interface type='hostdev'><source><address type='pci' domain='0' bus='1' "
                "slot='0' function='0'/></source></interface>"
            ),
            "type 'hostdev'",
        ),
        (PRIMARY.replace("<vcpu>", "<seclabel type='none'/><vcpu>"), "runs confined"),
    ],
)
def test_xml_that_reaches_the_replica_host_s_files_is_refused(xml: str, message: str) -> None:
    """A primary authorized for one VM sends its domain XML with ``enable``; the replica host
    defines and starts a domain from it at failover. Nothing in it may open, run or write the
    replica host's own files (each of these passed the device list before)."""
    with pytest.raises(InvalidArgument) as caught:
        definition.check(xml, UUID, 2)
    assert message in caught.value.message and "\n" not in caught.value.message


def test_what_a_replica_rewrites_or_may_have_is_kept(tmp_path: Path) -> None:
    fine = PRIMARY.replace("<vcpu>", "<seclabel type='dynamic' model='dac' relabel='yes'/><vcpu>")
    fine = fine.replace("<video>", "<rng model='virtio'><backend model='random'>/dev/urandom"
                        "</backend></rng><video>")  # fmt: skip
    fine = fine.replace("the shop's web server", "/srv/www is served from here")
    fine = fine.replace("<vcpu>", "<resource><partition>/machine</partition></resource><vcpu>")
    fine = fine.replace("<target dev='vnet3'/>",
                        "<target dev='vnet3'/><rom file='/usr/share/qemu/pxe.rom'/>")  # fmt: skip
    root = ET.fromstring(definition.replica_domain(fine, _want(tmp_path)))
    assert root.findtext("./devices/rng/backend") == "/dev/urandom"
    assert root.find("seclabel") is not None
    assert root.findtext("./resource/partition") == "/machine"
    rom = root.find("./devices/interface/rom")
    assert rom is not None and rom.get("file") == "/usr/share/qemu/pxe.rom"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (BILLION_LAUGHS, "DOCTYPE"),
        (EXTERNAL, "DOCTYPE"),
        ("<!DOCTYPE domain><domain/>", "DOCTYPE"),
        ("<domain><name>x</name>", "not well-formed"),
        ("", "not well-formed"),
        ("<network><name>x</name></network>", "<network> at its root"),
        ("<domain>" + "<x/>" * 70000 + "</domain>", "over the limit"),
        (PRIMARY.replace("<video>", "<hostdev mode='subsystem' type='pci'/><video>"), "<hostdev>"),
        (PRIMARY.replace("<video>", "<filesystem type='mount'/><video>"), "<filesystem>"),
        (PRIMARY.replace("<video>", "<tpm model='tpm-crb'/><video>"), "<tpm>"),
        (PRIMARY.replace("device='cdrom'", "device='lun'"), "device='lun'"),
        (PRIMARY.replace(UUID, TEST_UUID), "not the VM's"),
        (PRIMARY.replace(f"<uuid>{UUID}</uuid>", ""), "(none)"),
    ],
)
def test_hostile_or_unfit_xml_is_refused_in_one_line(xml: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        definition.check(xml, UUID, 2)
    assert message in caught.value.message and "\n" not in caught.value.message


def test_disk_count_must_match(tmp_path: Path) -> None:
    no_disks = PRIMARY.split("<disk type='block'")[0] + "</devices></domain>"
    with pytest.raises(InvalidArgument, match="0 disks, not the VM's 2"):
        definition.replica_domain(no_disks, _want(tmp_path))
    with pytest.raises(InvalidArgument, match="2 disks, not the VM's 1"):
        definition.replica_domain(PRIMARY, _want(tmp_path, disks=(tmp_path / "d",)))


def _enable(**kw: object) -> dict[str, object]:
    body: dict[str, object] = {
        "vm_id": UUID, "vm_name": "web", "cpus": 1, "memory_mb": 256, "disk_sizes": [1 << 30],
        "settings": {
            "frequency_sec": 300, "recovery_history": 0, "compression": True,
            "auto_resynchronize": True, "recovery_point_interval": 3600,
        },
        "replica_port": 443, "primary_port": None, "append": None,
        "kernel": None, "initrd": None,
    }  # fmt: skip
    body.update(kw)
    return body


def test_enable_request_definition_field() -> None:
    base = p.EnableRequest.from_json(_enable())
    assert base.definition is None and "definition" not in base.to_json()  # older replicas
    req = p.EnableRequest.from_json(_enable(definition=PRIMARY))
    assert req.definition == PRIMARY
    assert p.EnableRequest.from_json(json.loads(json.dumps(req.to_json()))).definition == PRIMARY
    for bad in (7, ["x"], "<domain>\x00</domain>", "<domain>" + "x" * (256 << 10) + "</domain>"):
        with pytest.raises(InvalidArgument, match="field 'definition'"):
            p.EnableRequest.from_json(_enable(definition=bad))
