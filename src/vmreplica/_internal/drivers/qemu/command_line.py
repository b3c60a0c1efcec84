"""The command line of a VM's QEMU, and the files it names in the VM's run directory (pure: no
process is started here; drivers/qemu/qemu.py starts and watches it)."""

from __future__ import annotations

import uuid
from pathlib import Path

from vmreplica._internal.drivers.qemu.qsd import blockdev_options, check_disks, node_name
from vmreplica._internal.ports.hypervisor import VmSpec
from vmreplica.errors import InvalidArgument, NotFound

QEMU_SYSTEM = "qemu-system-x86_64"


def qmp_path(spec: VmSpec) -> Path:
    """The VM's QMP monitor socket, in its run directory."""
    return spec.run_dir.absolute() / "qmp.sock"


def qga_path(spec: VmSpec) -> Path:
    """The host side of the guest agent's virtio-serial port, in its run directory."""
    return spec.run_dir.absolute() / "qga.sock"


def pid_path(spec: VmSpec) -> Path:
    return spec.run_dir.absolute() / "qemu.pid"


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's key=value option syntax, where ',' separates keys."""
    return str(value).replace(",", ",,")


def argv(spec: VmSpec) -> list[str]:
    run = spec.run_dir.absolute()
    args = [QEMU_SYSTEM, "-name", f"guest={_opt(spec.name)}", "-uuid", spec.id]
    args += ["-pidfile", str(pid_path(spec)), "-nodefaults", "-no-user-config"]
    cpu = "max" if spec.accel == "tcg" else "host"
    args += ["-machine", "q35", "-accel", spec.accel, "-cpu", cpu]
    args += ["-smp", str(spec.cpus), "-m", str(spec.memory_mb), "-display", "none"]
    args += ["-no-shutdown", "-nic", "none"]
    args += ["-chardev", f"socket,id=qmp,path={_opt(qmp_path(spec))},server=on,wait=off"]
    args += ["-mon", "chardev=qmp,mode=control"]
    args += ["-chardev", f"file,id=serial0,path={_opt(run / 'serial.log')}"]
    args += ["-serial", "chardev:serial0"]
    # The guest agent's channel (qemu-guest-agent in the guest): file-system freeze and thaw
    # for application-consistent recovery points.
    args += ["-chardev", f"socket,id=qga0,path={_opt(qga_path(spec))},server=on,wait=off"]
    args += ["-device", "virtio-serial-pci,id=vser0"]
    args += ["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    for options in blockdev_options(spec.disks):
        args += ["-blockdev", options]
    for i in range(len(spec.disks)):
        # share-rw lets HMP `qemu-io diskN` write beside the guest; qcow2 still takes the
        # image file exclusively, so another process cannot open it for writing.
        device = f'{{"driver":"virtio-blk-pci","drive":"{node_name(i)}","id":"vblk{i}",'
        # A direct kernel boot claims bootindex 0 for itself (linuxboot option ROM).
        boot = "" if spec.kernel is not None else f',"bootindex":{i}'
        args += ["-device", device + f'"share-rw":true{boot}}}']
    if spec.kernel is not None:
        args += ["-kernel", str(spec.kernel.absolute())]
    if spec.initrd is not None:
        args += ["-initrd", str(spec.initrd.absolute())]
    if spec.append is not None:
        args += ["-append", spec.append]
    return args


def validate(spec: VmSpec) -> None:
    try:
        uuid.UUID(spec.id)
    except ValueError:
        raise InvalidArgument(f"VM id {spec.id!r} is not a UUID") from None
    if not spec.name:
        raise InvalidArgument("VM name is empty")
    if spec.cpus < 1 or spec.memory_mb < 16:
        raise InvalidArgument(f"VM '{spec.name}' needs at least 1 CPU and 16 MiB of memory")
    if spec.accel not in ("tcg", "kvm"):
        raise InvalidArgument(f"accelerator {spec.accel!r} is not tcg or kvm")
    for label, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        if path is not None and not path.is_file():
            raise NotFound(f"{label} {path} of VM '{spec.name}' does not exist")
    if spec.initrd is not None and spec.kernel is None:
        raise InvalidArgument(f"VM '{spec.name}' has an initrd but no kernel")
    check_disks(spec.disks, f"VM '{spec.name}'")
