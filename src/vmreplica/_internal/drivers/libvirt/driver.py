"""The libvirt driver: the hypervisor port (ports/hypervisor.py) on libvirt domains.

VMs are persistent libvirt domains (domain.py); change tracking is libvirt's checkpoints and
backups (checkpoints.py), never QMP on bitmaps libvirt owns. Everything that is plain image work
on files libvirt does not hold — disk images, replica chains, an initial copy's import and the
copy itself, block hashes — is the QEMU driver's, delegated to it: the data path is the same
qemu-img, qemu-storage-daemon and NBD either way.

A VM that is off has no QEMU, and libvirt's backup API needs one: the driver starts the domain
*paused* (``VIR_DOMAIN_START_PAUSED``: QEMU opens the disks, the guest's CPUs never run, so
nothing writes), does the checkpoint or backup work, and destroys it gracefully (SIGTERM: QEMU
closes the images and stores the bitmaps). A marker in the run directory tells the agent after a
crash that such a domain is its own helper, not a VM someone started.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from vmreplica._internal.drivers.libvirt import domain, domain_xml, raw
from vmreplica._internal.drivers.libvirt.checkpoints import Tracker
from vmreplica._internal.drivers.libvirt.connection import Connection, is_missing
from vmreplica._internal.drivers.qemu import nbd_copy, nbd_extents, qemu_img
from vmreplica._internal.drivers.qemu.block_read import NbdView
from vmreplica._internal.drivers.qemu.driver import INITIAL_DIR, QemuDriver
from vmreplica._internal.drivers.qemu.qsd import node_name, start_storage_daemon
from vmreplica._internal.drivers.qemu.tls_creds import kv
from vmreplica._internal.extents import Extent, align, coalesce
from vmreplica._internal.files import fsync_dir
from vmreplica._internal.ports.hypervisor import DefinedVm, DiskOwner, VmProcess, VmSpec
from vmreplica.errors import InvalidArgument, InvalidState, VmrError

# How a cycle cuts its delta: "push" (libvirt's backup job writes the delta files) or "pull"
# (the agent copies the dirty ranges from libvirt's NBD export); push measured faster
# (bench/bench_libvirt_cycle.py, docs/ARCHITECTURE.md).
CUT_MODE = "push"
WORK_DIR = "libvirt"  # in the VM's run directory: backup sockets, scratch images
HELPER_MEMORY_MB = 128


async def _copy_into(
    source: Path, exports: Sequence[str], dests: Sequence[Path],
    extents: Mapping[int, Sequence[Extent]], work: Path,
) -> int:  # fmt: skip
    """Copy ``extents[n]`` of export ``exports[n]`` on ``source`` into the qcow2 ``dests[n]``
    in place, through a storage daemon of our own on the destination files (writes to new
    files nobody else has open). Returns the bytes copied."""
    todo = [n for n in range(len(dests)) if extents.get(n)]
    if not todo:
        return 0
    files = tuple(Path(dests[n]).absolute() for n in todo)
    daemon = await start_storage_daemon(files, work / "copy")
    copied = 0
    try:
        nodes = [node_name(i) for i in range(len(files))]
        async with nbd_extents.writable_exports(daemon, nodes, work / "copy" / "nbd.sock") as (
            sock,
            sinks,
        ):
            for n, (sink, cluster, size) in zip(todo, sinks, strict=True):
                ranges = align(extents[n], cluster, size)
                copied += await asyncio.to_thread(
                    nbd_extents.copy_between, str(source), exports[n], sock, sink, ranges, cluster
                )
        await daemon.stop()  # flushes and closes the files
    except BaseException:
        await daemon.kill()
        raise
    for parent in sorted({f.parent for f in files}):
        fsync_dir(parent)
    return copied


def _format(formats: tuple[str | None, ...], index: int) -> str | None:
    return formats[index] if index < len(formats) else None


@dataclass
class LibvirtSession:
    tracker: Tracker
    owner: DiskOwner
    work: Path
    cut_mode: str = CUT_MODE

    @property
    def exports(self) -> list[str]:
        return list(self.tracker.disks)

    async def settle(self, generation: int) -> None:
        await self.tracker.settle(generation)

    async def cut(self, generation: int, dests: Sequence[Path]) -> None:
        owner = self.owner
        sizes = [
            await raw.disk_size(owner.disks[i], owner.run_dir, i, _format(owner.formats, i))
            for i in owner.replicated
        ]
        if self.cut_mode == "pull":
            await self._cut_pull(generation, dests, sizes)
        else:
            await self.tracker.cut(generation, dests, sizes)

    async def _cut_pull(self, generation: int, dests: Sequence[Path], sizes: Sequence[int]) -> None:
        """Pull mode, kept to measure against push (bench/bench_libvirt_cycle.py): libvirt
        exports the disks with G's bitmap, and the agent copies the dirty ranges itself."""
        files = [Path(d).absolute() for d in dests]
        for f in files:
            if f.exists():
                raise InvalidState(f"cannot cut a delta: {f} already exists")
        ok = False
        try:
            async with self.tracker.pull(
                self.work, incremental=generation, checkpoint=generation + 1
            ) as sock:
                extents = {
                    n: await asyncio.to_thread(nbd_extents.read_dirty, str(sock), d, f"backup-{d}")
                    for n, d in enumerate(self.exports)
                }
                for f, size in zip(files, sizes, strict=True):
                    await qemu_img.create(f, size)
                await _copy_into(sock, self.exports, files, extents, self.work)
            for parent in sorted({f.parent for f in files}):
                fsync_dir(parent)
            ok = True
        finally:
            if not ok:
                for f in files:
                    f.unlink(missing_ok=True)
                with contextlib.suppress(VmrError):
                    await self.tracker.drop(generation + 1)

    async def drop(self, generation: int) -> None:
        await self.tracker.drop(generation)

    async def stop_tracking(self) -> None:
        await self.tracker.remove_all()

    async def cut_top(self, dests: Sequence[Path]) -> None:
        """What the VM wrote into its top images, read from a pull backup that starts
        checkpoint 1 at its instant. The top's allocation is mapped after that instant: it
        covers every write before it, and a range written since reads as it was then."""
        await self.tracker.remove_all()
        tops = [self.owner.disks[i] for i in self.owner.replicated]
        created: list[Path] = []
        try:
            async with self.tracker.pull(self.work, checkpoint=1) as sock:
                extents: dict[int, list[Extent]] = {}
                for n, (top, dest) in enumerate(zip(tops, dests, strict=True)):
                    mapped = await qemu_img.map(top, force_share=True)
                    extents[n] = coalesce(
                        (e.start, e.length) for e in mapped if e.present and e.depth == 0
                    )
                    if Path(dest).exists():
                        raise InvalidState(f"cannot copy into {dest}: it already exists")
                    await qemu_img.create(dest, await qemu_img.virtual_size(top, force_share=True))
                    created.append(Path(dest))
                await _copy_into(sock, self.exports, dests, extents, self.work)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            with contextlib.suppress(VmrError):
                await self.tracker.remove_all()
            raise

    async def dirty_extents(self, generation: int) -> list[list[Extent]]:
        async with self.tracker.pull(self.work, incremental=generation) as sock:
            return [
                await asyncio.to_thread(nbd_extents.read_dirty, str(sock), d, f"backup-{d}")
                for d in self.exports
            ]

    async def copy_ranges(
        self, dests: Sequence[Path], extents: Mapping[int, Sequence[Extent]]
    ) -> int:
        if not any(extents.values()):
            return 0
        async with self.tracker.pull(self.work) as sock:
            return await _copy_into(sock, self.exports, dests, extents, self.work)


class LibvirtDriver(QemuDriver):
    """Images, chains, imports and copies are the QEMU driver's (inherited); VMs, sessions and
    point-in-time views are libvirt's."""

    def __init__(
        self, uri: str = "qemu:///system", accel: str = "tcg", cut_mode: str = CUT_MODE
    ) -> None:
        super().__init__(accel)
        self.uri = uri
        self.conn = Connection(uri)
        self.cut_mode = cut_mode

    # -- VMs ---------------------------------------------------------------------------------

    async def launch(self, spec: VmSpec) -> VmProcess:
        return await domain.launch(self.conn, spec)

    async def attach(self, spec: VmSpec) -> VmProcess | None:
        return await domain.attach(self.conn, spec)

    # -- disk images: raw disks too (raw.py) ---------------------------------------------------

    async def check_image(self, path: Path) -> None:
        if raw.is_raw(path):
            if await raw.image_size(path) <= 0:
                raise InvalidArgument(f"{path} is an empty raw disk")
            return
        await super().check_image(path)

    async def virtual_size(self, path: Path, fmt: str | None = None) -> int:
        if fmt is not None:
            return await qemu_img.virtual_size(path, fmt=fmt, force_share=True)
        return await raw.image_size(path)

    async def disk_format(self, path: Path, run_dir: Path | None = None, index: int = 0) -> str:
        if run_dir is not None and await raw.known_raw(path, run_dir, index):
            return "raw"
        return "raw" if raw.is_raw(path) else "qcow2"

    async def required_size(self, path: Path, fmt: str | None = None) -> int:
        if (fmt or ("raw" if raw.is_raw(path) else "qcow2")) == "raw":
            return await qemu_img.measure_required(path, fmt="raw")
        return await super().required_size(path)

    async def defined_vms(self) -> list[DefinedVm]:
        return [DefinedVm(s, r) for s, r in await domain.defined(self.conn, self.accel)]

    async def forget(self, vm_id: str) -> None:
        await domain.undefine(self.conn, vm_id)

    async def definition(self, vm_id: str) -> str | None:
        return await domain.xml_of(self.conn, vm_id)

    async def restore(self, xml: str) -> None:
        await domain.define_xml(self.conn, xml)

    async def start_tracking_offline(self, disks: Sequence[Path], generation: int = 1) -> None:
        raise InvalidState(
            "under libvirt, tracking starts through a checkpoint of the domain, not on bare images"
        )

    # -- the domain of a VM that is off ----------------------------------------------------

    async def _ensure_defined(self, owner: DiskOwner) -> None:
        """The domain, with the owner's disks; a minimal definition if it has none (`vm start`
        defines it in full)."""

        def current(c: Any) -> str | None:
            try:
                dom = c.lookupByUUIDString(owner.vm_id)
            except libvirt.libvirtError as exc:
                if is_missing(exc):
                    return None
                raise
            return str(dom.XMLDesc(0))

        if not owner.vm_id:
            raise VmrError(f"VM '{owner.vm_name}': the libvirt driver needs the VM's id")
        xml = await self.conn.run(f"cannot look up domain {owner.vm_name!r}", current)
        found = None if xml is None else [p for _, p in domain_xml.disk_sources(xml)]
        declared = frozenset() if xml is None else domain_xml.declared_raw(xml, owner.disks)
        want = list(
            await raw.domain_disks(tuple(owner.disks), owner.run_dir, owner.formats, declared)
        )
        if found is not None and [p.absolute() for p in found] == want:
            return
        spec = VmSpec(
            id=owner.vm_id, name=owner.vm_name, cpus=1, memory_mb=HELPER_MEMORY_MB,
            disks=tuple(owner.disks), run_dir=owner.run_dir, accel=self.accel,
            formats=owner.formats,
        )  # fmt: skip
        await domain.define(self.conn, spec)

    @contextlib.asynccontextmanager
    async def _running(self, owner: DiskOwner) -> AsyncIterator[None]:
        """The domain has a QEMU for the length of this: its own, or one started paused."""
        if owner.process is not None:
            yield
            return
        owner.run_dir.mkdir(parents=True, exist_ok=True)
        mark = owner.run_dir / domain.HELPER_MARK
        await self._ensure_defined(owner)

        def start(c: Any) -> None:
            dom = c.lookupByUUIDString(owner.vm_id)
            if dom.isActive():
                if not mark.exists():
                    raise InvalidState(
                        f"VM '{owner.vm_name}' runs in libvirt but not under the agent: "
                        "stop it with virsh, or start it with `vmreplica vm start`"
                    )
                return  # our own paused helper, left by a crash
            mark.touch()
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)

        def stop(c: Any) -> None:
            dom = c.lookupByUUIDString(owner.vm_id)
            if dom.isActive():
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            mark.unlink(missing_ok=True)

        await self.conn.run(f"cannot start domain {owner.vm_name!r} paused", start)
        try:
            yield
        finally:
            await self.conn.run(f"cannot stop domain {owner.vm_name!r}", stop)

    async def _tracker(self, owner: DiskOwner) -> Tracker:
        """Disks by the domain's own targets: a domain defined with virsh may have sda, hdb…"""
        names = await domain.targets(self.conn, owner.vm_id)
        return Tracker(
            self.conn, owner.vm_id, [names[i] for i in owner.replicated], names, owner.vm_name
        )

    # -- sessions and copies -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self, owner: DiskOwner) -> AsyncIterator[LibvirtSession]:  # type: ignore[override]
        async with self._running(owner):
            yield LibvirtSession(
                await self._tracker(owner), owner, owner.run_dir / WORK_DIR, self.cut_mode
            )

    @contextlib.asynccontextmanager
    async def point_in_time(
        self, owner: DiskOwner, generation: int | None
    ) -> AsyncIterator[nbd_copy.Source]:
        """A pull backup's exports, checkpoint ``generation`` created at its instant."""
        work = owner.run_dir / INITIAL_DIR
        try:
            async with self._running(owner):
                tracker = await self._tracker(owner)
                if generation is not None:
                    await tracker.remove_all()
                async with tracker.pull(work, checkpoint=generation) as sock:
                    names = tracker.disks
                    yield nbd_copy.Source(
                        tuple(
                            f"driver=nbd,server.type=unix,server.path={kv(str(sock))},export={n}"
                            for n in names
                        ),
                        tuple(NbdView(socket=sock, export=n) for n in names),
                    )
        finally:
            shutil.rmtree(work, ignore_errors=True)
