"""VMs as persistent libvirt domains: define, start, find again, watch, stop.

A domain outlives the agent and libvirtd alike. libvirt-python's event loop would need a thread
of its own and a reconnect dance after a libvirtd restart; the watch polls the domain's state
every half second instead, and rides out libvirtd being away (the domain runs on meanwhile).

A domain the driver started paused only to work on its disks (driver.py: libvirt's backup API
needs a running domain) carries a marker file in the VM's run directory; found so after an
agent crash, it is destroyed, never taken for a running VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from vmreplica._internal import definition
from vmreplica._internal.drivers.libvirt import domain_xml, raw
from vmreplica._internal.drivers.libvirt.connection import Connection, is_missing
from vmreplica._internal.ports.hypervisor import GuestAgentUnavailable, VmSpec
from vmreplica.errors import AccessDenied, InvalidState, NotFound, VmrError

_HMP_INFO = re.compile(r"info(?: +[A-Za-z0-9_-]+)*")
_HMP_QEMU_IO = re.compile(r'qemu-io +(?:-d +)?([A-Za-z0-9_/-]+) +("[^"]*")')
_DISK_NODE = re.compile(r"disk(\d+)")
HELPER_MARK = "libvirt-helper"  # in the run directory: started paused by the driver
_POLL = 0.5
_DIED = {
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED,
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN,
}


def _is_block(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def _lookup(conn: Any, spec_id: str, name: str) -> Any:
    """The domain of this UUID, or None; another domain of the same name is refused."""
    try:
        return conn.lookupByUUIDString(spec_id)
    except libvirt.libvirtError as exc:
        if not is_missing(exc):
            raise
    try:
        other = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if is_missing(exc):
            return None
        raise
    raise InvalidState(
        f"libvirt already has a domain named {name!r} with another UUID ({other.UUIDString()})"
    )


async def define(conn: Connection, spec: VmSpec, description: str | None = None) -> None:
    """Define (or update) the domain of ``spec``; its checkpoints stay. A domain vmreplica
    generated is generated again; one defined by someone else (virsh, virt-manager) keeps its
    own XML, only its disks pointed where the VM's are now. A raw disk is opened through its
    metadata image (raw.py). A replica VM whose primary sent its domain XML is defined from
    that, every time (definition.py)."""
    current_xml = await xml_of(conn, spec.id)
    declared = (
        frozenset() if current_xml is None else domain_xml.declared_raw(current_xml, spec.disks)
    )
    disks = await raw.domain_disks(spec.disks, spec.run_dir, spec.formats, declared)
    if spec.definition is not None:
        generated = definition.replica_domain(
            spec.definition.xml,
            definition.ReplicaDomain(
                name=spec.name, uuid=spec.id, disks=disks, run_dir=spec.run_dir,
                accel=spec.accel, kernel=spec.kernel, initrd=spec.initrd, append=spec.append,
                test=spec.definition.test,
            ),
            [_is_block(d) for d in disks],
        )  # fmt: skip
    else:
        generated = domain_xml.domain_xml(
            dataclasses.replace(spec, disks=disks), ["qcow2"] * len(disks),
            description or domain_xml.DESCRIPTION,
        )  # fmt: skip

    def go(c: Any) -> None:
        dom = _lookup(c, spec.id, spec.name)
        xml = generated
        if dom is not None and spec.definition is None:
            current = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            if not domain_xml.managed(current):
                xml = domain_xml.with_disks(current, disks)
        c.defineXML(xml)

    await conn.run(f"cannot define domain {spec.name!r}", go)


async def defined(conn: Connection, accel: str) -> list[tuple[VmSpec, bool]]:
    """Every domain, as a spec (no run directory) and whether it runs."""

    def go(c: Any) -> list[tuple[VmSpec, bool]]:
        out = []
        for dom in c.listAllDomains():
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            out.append((domain_xml.spec_of(xml, Path(), accel), bool(dom.isActive())))
        return out

    found: list[tuple[VmSpec, bool]] = await conn.run("cannot list libvirt's domains", go)
    return found


async def xml_of(conn: Connection, vm_id: str) -> str | None:
    """The domain's persistent XML (no secrets), or None when there is no such domain."""

    def go(c: Any) -> str | None:
        try:
            dom = c.lookupByUUIDString(vm_id)
        except libvirt.libvirtError as exc:
            if is_missing(exc):
                return None
            raise
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    found: str | None = await conn.run(f"cannot read domain {vm_id}", go)
    return found


async def define_xml(conn: Connection, xml: str) -> None:
    """Define a domain from XML ``xml_of`` read (a step after its undefine failed)."""

    def go(c: Any) -> None:
        c.defineXML(xml)

    await conn.run("cannot define the domain again", go)


async def targets(conn: Connection, vm_id: str) -> list[str]:
    """The domain's disk targets (vda, sdb, …), in the order of its disks."""

    def go(c: Any) -> list[str]:
        xml = c.lookupByUUIDString(vm_id).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        return [t for t, _ in domain_xml.disk_sources(xml)]

    found: list[str] = await conn.run(f"cannot read domain {vm_id}", go)
    return found


async def undefine(conn: Connection, vm_id: str) -> None:
    """The domain goes, its checkpoints first, bitmaps included, through libvirt (started
    paused for it if it is off): a bitmap left in an image that later becomes a backing file
    (a replica chain's base) makes libvirt refuse a new checkpoint of the same name above it."""

    def go(c: Any) -> None:
        try:
            dom = c.lookupByUUIDString(vm_id)
        except libvirt.libvirtError as exc:
            if is_missing(exc):
                return
            raise
        # Parents before children: deleted in reverse, each is a leaf when it goes.
        checkpoints = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        disks = [p for _, p in domain_xml.disk_sources(dom.XMLDesc(0))]
        if checkpoints and all(p.exists() for p in disks):
            if not dom.isActive():
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            for cp in reversed(checkpoints):
                with contextlib.suppress(libvirt.libvirtError):
                    cp.delete()
        if dom.isActive():
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        )

    await conn.run(f"cannot undefine domain {vm_id}", go)


def find_pid(vm_id: str, disk: Path | None) -> int:
    """QEMU's pid, from /proc: the process of this UUID that opened this disk (on one machine
    a primary and its replica run with the same UUID). 0 when it cannot be found."""
    want = f"-uuid\0{vm_id}\0".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if want in cmdline and (disk is None or str(disk.absolute()).encode() in cmdline):
            return int(entry.name)
    return 0


async def launch(conn: Connection, spec: VmSpec) -> LibvirtVm:
    await define(conn, spec)

    def start(c: Any) -> None:
        dom = c.lookupByUUIDString(spec.id)
        if dom.isActive():
            if not (spec.run_dir / HELPER_MARK).exists():
                raise InvalidState(f"domain {spec.name!r} is already running in libvirt")
            dom.destroy()  # the driver's own paused helper, left by a crash
        (spec.run_dir / HELPER_MARK).unlink(missing_ok=True)
        dom.create()

    await conn.run(f"cannot start domain {spec.name!r}", start)
    return LibvirtVm(conn, spec)


async def attach(conn: Connection, spec: VmSpec) -> LibvirtVm | None:
    def find(c: Any) -> bool:
        try:
            dom = c.lookupByUUIDString(spec.id)
        except libvirt.libvirtError as exc:
            if is_missing(exc):
                return False
            raise
        if not dom.isActive():
            return False
        if (spec.run_dir / HELPER_MARK).exists():
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            (spec.run_dir / HELPER_MARK).unlink(missing_ok=True)
            return False
        return True

    found = await conn.run(f"cannot look up domain {spec.name!r}", find)
    return LibvirtVm(conn, spec) if found else None


class LibvirtVm:
    """A running domain (the port's VmProcess)."""

    def __init__(self, conn: Connection, spec: VmSpec) -> None:
        self._conn = conn
        self.spec = spec
        first = None
        if spec.disks:
            meta = raw.meta_path(spec.run_dir, 0)
            fmt = spec.formats[0] if spec.formats else None
            told = fmt if fmt is not None else "raw" if raw.is_raw(spec.disks[0]) else "qcow2"
            first = meta if meta.exists() or told == "raw" else spec.disks[0]
        self._pid = find_pid(spec.id, first)

    def _dom(self, c: Any) -> Any:
        return c.lookupByUUIDString(self.spec.id)

    async def domain_call(self, what: str, method: str, *args: Any) -> Any:
        return await self._conn.run(
            f"{what} of VM '{self.spec.name}'", lambda c: getattr(self._dom(c), method)(*args)
        )

    @property
    def pid(self) -> int:
        return self._pid

    async def _state(self) -> tuple[int, int] | None:
        """(state, reason), or None while libvirt cannot be reached."""
        try:
            state = await self.domain_call("state", "state")
        except NotFound:
            return (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
        except VmrError:
            return None
        return int(state[0]), int(state[1])

    async def status(self) -> str:
        state = await self._state()
        if state is None:
            return "unknown"
        names = {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down
            libvirt.VIR_DOMAIN_SHUTOFF: "shutdown",
            libvirt.VIR_DOMAIN_CRASHED: "guest-panicked",
        }
        return names.get(state[0], "unknown")

    async def _wait_off(self, timeout: float | None) -> tuple[int, int] | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            state = await self._state()
            if state is not None and state[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                return state
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(_POLL)

    async def wait_exit_or_shutdown(self) -> bool:
        state = await self._wait_off(None)
        assert state is not None
        return state[1] not in _DIED

    async def wait_shutdown(self, timeout: float) -> bool:
        state = await self._wait_off(timeout)
        return state is not None and state[1] not in _DIED

    async def powerdown(self) -> None:
        await self.domain_call(
            "ACPI power button", "shutdownFlags", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        )

    async def quit(self, timeout: float = 30.0) -> None:
        """SIGTERM only (graceful destroy): QEMU closes its images and stores the bitmaps."""
        with contextlib.suppress(NotFound):
            state = await self._state()
            if state is not None and state[0] != libvirt.VIR_DOMAIN_SHUTOFF:
                with contextlib.suppress(VmrError):
                    await self.domain_call(
                        "stop", "destroyFlags", libvirt.VIR_DOMAIN_DESTROY_GRACEFUL
                    )
        if await self._wait_off(timeout) is None:
            raise VmrError(f"VM '{self.spec.name}': QEMU did not exit within {timeout:g}s")

    async def kill(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(NotFound):
            await self.domain_call("kill", "destroy")
        if await self._wait_off(timeout) is None:
            raise VmrError(f"VM '{self.spec.name}': QEMU survived destroy")

    async def disconnect(self) -> None:
        """The connection is the driver's; the domain runs on."""

    async def monitor(self, command: str, test_writes: bool) -> str:
        """Only read-only ``info``, and ``qemu-io diskN`` where the host allows test writes, as
        with the QEMU driver; ``diskN`` is the N-th disk's virtio device under libvirt."""
        io = _HMP_QEMU_IO.fullmatch(command)
        if _HMP_INFO.fullmatch(command) is None and not (test_writes and io is not None):
            first = command.split()[0] if command else "(empty)"
            hint = "" if test_writes else " (qemu-io needs allow_qemu_io in host.toml, for tests)"
            raise AccessDenied(
                f"vm monitor runs only read-only `info` commands, not {first!r}{hint}"
            )
        if io is not None:
            disk = _DISK_NODE.fullmatch(io.group(1))
            if disk is None:
                raise AccessDenied("qemu-io under libvirt takes a disk as diskN")
            device = f"/machine/peripheral/virtio-disk{disk.group(1)}/virtio-backend"
            command = f"qemu-io -d {device} {io.group(2)}"
        return await self._hmp(command)

    async def _hmp(self, command: str) -> str:
        """qemu-io prints on QEMU's stdout, which libvirt sends to the domain's log: read it
        through /proc (the log may be in another mount namespace)."""
        out = Path(f"/proc/{self._pid}/fd/1") if self._pid else None
        start = 0
        with contextlib.suppress(OSError):
            if out is not None:
                start = os.stat(out).st_size
        reply = await self._conn.run(
            f"monitor of VM '{self.spec.name}'",
            lambda c: libvirt_qemu.qemuMonitorCommand(
                self._dom(c), command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            ),
        )
        printed = ""
        with contextlib.suppress(OSError):
            if out is not None:
                with open(out, "rb") as f:
                    f.seek(start)
                    printed = f.read().decode(errors="replace")
        return (str(reply) + printed).replace("\r\n", "\n")

    async def _agent(self, what: str, method: str) -> int:
        try:
            return int(await self.domain_call(what, method))
        except VmrError as exc:
            if "agent" in exc.message.lower():
                raise GuestAgentUnavailable(exc.message) from exc
            raise

    async def freeze_filesystems(self, timeout: float) -> int:
        return await self._agent("freezing file systems", "fsFreeze")

    async def thaw_filesystems(self, timeout: float) -> int:
        return await self._agent("thawing file systems", "fsThaw")
