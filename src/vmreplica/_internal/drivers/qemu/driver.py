"""The QEMU driver: the hypervisor port (ports/hypervisor.py) on qemu-system, qemu-storage-daemon
and qemu-img, without libvirt. Each piece of the port maps onto one module of this package; this
one only puts them together and keeps the engine's words (disk positions, generations, run
directories) apart from QEMU's (node names, bitmaps, sockets).

A session on a running VM talks to its QEMU over QMP; on a VM that is off, it opens the disks in
a qemu-storage-daemon for the length of the session, the same block layer with the same node
names, so every tracking operation has one implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmreplica._internal.drivers.qemu import (
    block_hash,
    block_read,
    children,
    compact,
    nbd_copy,
    nbd_extents,
    nbd_import,
    qemu,
    qemu_img,
    tls_creds,
    tracking,
)
from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon, node_name, start_storage_daemon
from vmreplica._internal.extents import Extent, coalesce
from vmreplica._internal.ports.hypervisor import (
    CopySource,
    DefinedVm,
    DiskOwner,
    NbdCredentials,
    Progress,
    VmProcess,
    VmSpec,
)
from vmreplica.errors import InvalidArgument, VmrError

NBD_SOCKET = "nbd.sock"  # in the VM's run directory, beside a storage daemon's monitor
INITIAL_DIR = "initial"  # in the VM's run directory: what an initial copy needs (TLS links, …)


def _target(process: VmProcess | None) -> QmpTarget | None:
    if process is None:
        return None
    assert isinstance(process, qemu.QemuVm), "a process of another driver"
    return process


@dataclass
class QemuSession:
    """The replicated disks of one VM, as QMP nodes ``disk{i}`` of its QEMU or storage daemon."""

    target: QmpTarget
    nodes: tuple[str, ...]
    run_dir: Path

    async def settle(self, generation: int) -> None:
        await tracking.settle(self.target, self.nodes, generation)

    async def cut(self, generation: int, dests: Sequence[Path]) -> None:
        copied = await tracking.rotate(self.target, self.nodes, generation, dests)
        await compact.compact(
            self.target, self.nodes, generation, dests, copied, self.run_dir / NBD_SOCKET
        )

    async def drop(self, generation: int) -> None:
        await tracking.drop(self.target, self.nodes, generation)

    async def stop_tracking(self) -> None:
        await tracking.remove_all(self.target, self.nodes)

    async def cut_top(self, dests: Sequence[Path]) -> None:
        await tracking.start_from_top(self.target, self.nodes, dests)

    async def dirty_extents(self, generation: int) -> list[list[Extent]]:
        return await nbd_extents.dirty_extents(
            self.target, self.nodes, tracking.name(generation), self.run_dir / NBD_SOCKET
        )

    async def copy_ranges(
        self, dests: Sequence[Path], extents: Mapping[int, Sequence[Extent]]
    ) -> int:
        return await nbd_extents.copy_ranges(
            self.target, self.nodes, dests, extents, self.run_dir / NBD_SOCKET
        )


@dataclass(frozen=True)
class QemuImport:
    """An initial copy's new images, open in a storage daemon that serves them over NBD+TLS."""

    daemon: StorageDaemon
    port: int
    exports: tuple[str, ...]

    async def finish(self) -> None:
        try:
            await self.daemon.stop()  # closes the images: metadata written, flushed
        except BaseException:
            await self.daemon.kill()
            raise

    async def discard(self) -> None:
        await self.daemon.kill()


class QemuDriver:
    def __init__(self, accel: str = "tcg") -> None:
        self.accel = accel
        # Per live point-in-time view (by id) and disk: the view with its image's layout, taken
        # once (nothing writes a view's images while it lives) instead of per batch.
        self._views: dict[tuple[int, int], block_read.NbdView] = {}

    async def _view(self, source: nbd_copy.Source, disk: int) -> block_read.NbdView:
        key = (id(source), disk)
        if (view := self._views.get(key)) is None:
            view = await block_hash.with_layout(source.views[disk])
            if key not in self._views:
                weakref.finalize(source, self._views.pop, key, None)
                self._views[key] = view
        return view

    # -- VMs ---------------------------------------------------------------------------------

    async def launch(self, spec: VmSpec) -> VmProcess:
        return await qemu.launch(spec)

    async def attach(self, spec: VmSpec) -> VmProcess | None:
        return await qemu.attach(spec)

    async def defined_vms(self) -> list[DefinedVm]:
        return []

    async def forget(self, vm_id: str) -> None:
        """QEMU keeps no definition of a VM: the agent's database is all there is."""

    async def definition(self, vm_id: str) -> str | None:
        return None

    async def restore(self, xml: str) -> None:
        """Nothing to define again (``definition`` gives none)."""

    # -- disk images -------------------------------------------------------------------------

    async def check_image(self, path: Path) -> None:
        try:
            await qemu_img.info(path)
        except VmrError as e:  # the operator named a file that is no image: not a storage fault
            raise InvalidArgument(f"{path} is not a usable qcow2 image: {e.message}") from e

    async def create_image(self, path: Path, size: int | None, backing: Path | None = None) -> None:
        await qemu_img.create(path, size, backing)

    async def virtual_size(self, path: Path, fmt: str | None = None) -> int:
        return await qemu_img.virtual_size(path, fmt=fmt or qemu_img.FORMAT, force_share=True)

    async def disk_format(self, path: Path, run_dir: Path | None = None, index: int = 0) -> str:
        return qemu_img.FORMAT  # the only one it runs (check_image)

    async def check_standalone(self, path: Path) -> None:
        try:
            info = await qemu_img.info(path)
        except VmrError as e:
            raise InvalidArgument(
                f"{path} is not a readable qcow2 image: convert it first (qemu-img convert -O "
                f"qcow2): {e.message}"
            ) from e
        data = info.get("format-specific", {}).get("data", {})
        if info.get("backing-filename") is not None:
            raise InvalidArgument(
                f"{path} has a backing file ({info['backing-filename']}): make it standalone "
                "first (qemu-img convert -O qcow2, or qemu-img rebase -b '')"
            )
        if "data-file" in data or data.get("corrupt"):
            raise InvalidArgument(f"{path} is marked corrupt or uses an external data file")

    async def required_size(self, path: Path, fmt: str | None = None) -> int:
        return await qemu_img.measure_required(path, fmt=fmt or qemu_img.FORMAT)

    async def allocated(self, image: Path) -> list[Extent]:
        """Data or zero clusters the image holds itself (a zeroed range is a change too); not
        what shows through from below, nor the unallocated rest, which ``qemu-img map`` also
        reports as zero."""
        return coalesce(
            (e.start, e.length) for e in await qemu_img.map(image) if e.present and e.depth == 0
        )

    async def start_tracking_offline(self, disks: Sequence[Path], generation: int = 1) -> None:
        for disk in disks:
            for bitmap in await qemu_img.bitmaps(disk):
                if bitmap.name.startswith(tracking.PREFIX):
                    await qemu_img.bitmap_remove(disk, bitmap.name)
            await qemu_img.bitmap_add(disk, tracking.name(generation))

    # -- sessions and copies -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _open(self, owner: DiskOwner) -> AsyncIterator[QmpTarget]:
        """The running VM's QEMU, or a storage daemon on the disks of a VM that is off."""
        running = _target(owner.process)
        if running is not None:
            yield running
            return
        owner.run_dir.mkdir(parents=True, exist_ok=True)
        daemon = await start_storage_daemon(owner.disks, owner.run_dir, vm_name=owner.vm_name)
        try:
            yield daemon
        finally:
            await daemon.stop()

    @contextlib.asynccontextmanager
    async def session(self, owner: DiskOwner) -> AsyncIterator[QemuSession]:
        async with self._open(owner) as target:
            yield QemuSession(target, tuple(node_name(i) for i in owner.replicated), owner.run_dir)

    @contextlib.asynccontextmanager
    async def point_in_time(
        self, owner: DiskOwner, generation: int | None
    ) -> AsyncIterator[nbd_copy.Source]:
        """Everything the copy needs (fleecing overlays, the export's socket, TLS links) lives in
        the VM's run directory under ``initial/``, and goes when the view does."""
        work = owner.run_dir / INITIAL_DIR
        try:
            running = _target(owner.process)
            if running is None:
                # Off, and kept off by the caller's lock: qemu-img reads the images themselves.
                disks = [owner.disks[i] for i in owner.replicated]
                if generation is not None:
                    await self.start_tracking_offline(disks, generation)
                yield nbd_copy.file_source(disks)
                return
            nodes = [node_name(i) for i in owner.replicated]
            bitmap = None
            if generation is not None:
                await tracking.remove_all(running, nodes)
                bitmap = tracking.name(generation)
            source = await nbd_copy.export_source(running, nodes, work, bitmap)
            try:
                yield source
            finally:
                with contextlib.suppress(VmrError, TimeoutError):
                    await nbd_copy.close_source(running, source)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def copy_to(
        self,
        source: CopySource,
        disk: int,
        address: str,
        port: int,
        export: str,
        tls: NbdCredentials,
        tls_hostname: str,
        work_dir: Path,
        progress: Progress | None = None,
        max_bytes_per_sec: int = 0,
    ) -> None:
        assert isinstance(source, nbd_copy.Source), "a source of another driver"
        creds = tls_creds.tls_creds(work_dir / INITIAL_DIR / "tls", tls, "client")
        await nbd_copy.convert(
            source, disk, address, port, export, creds, tls_hostname, progress,
            max_bytes_per_sec=max_bytes_per_sec,
        )  # fmt: skip

    async def export_to_file(
        self, source: CopySource, disk: int, dest: Path, progress: Progress | None = None
    ) -> None:
        assert isinstance(source, nbd_copy.Source), "a source of another driver"
        await nbd_copy.export_to_file(source, disk, dest, progress)

    async def hash_view(
        self, source: CopySource, disk: int, block_size: int, first_block: int = 0,
        count: int | None = None,
    ) -> list[bytes | None]:  # fmt: skip
        assert isinstance(source, nbd_copy.Source), "a source of another driver"
        view = await self._view(source, disk)
        return await block_hash.hash_view(view, block_size, first_block, count)

    async def hash_image(
        self, image: Path, block_size: int, first_block: int = 0, count: int | None = None
    ) -> list[bytes | None]:
        view = block_read.NbdView(image=image)
        return await block_hash.hash_view(view, block_size, first_block, count)

    async def extract_blocks(
        self, source: CopySource, disk: int, dest: Path, blocks: Sequence[int], block_size: int,
        skip_zeros: bool = False,
    ) -> int:  # fmt: skip
        assert isinstance(source, nbd_copy.Source), "a source of another driver"
        view = await self._view(source, disk)
        size = await asyncio.to_thread(block_hash.view_size, view)
        await qemu_img.create(dest, size)
        try:
            return await asyncio.to_thread(
                block_hash.copy_blocks, view, dest, blocks, block_size, skip_zeros
            )
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    async def open_import(
        self,
        files: Sequence[Path],
        sizes: Sequence[int],
        work_dir: Path,
        vm_name: str,
        tls: NbdCredentials,
        peer_identity: str,
        listen_host: str,
        ports: tuple[int, int] | None,
    ) -> QemuImport:
        run_dir = work_dir / INITIAL_DIR
        shutil.rmtree(run_dir, ignore_errors=True)  # what an earlier attempt left
        for file, size in zip(files, sizes, strict=True):
            await qemu_img.create(file, size)
        direct = nbd_copy.supports_direct_io(files[0].parent)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        creds = tls_creds.tls_creds(run_dir / "tls", tls, "server")
        with nbd_import.listen(listen_host, ports) as sock:
            port = int(sock.getsockname()[1])
            daemon = await start_storage_daemon(
                tuple(files), run_dir, vm_name, direct=direct, env=nbd_copy.BULK_ENV,
                args=nbd_import.server_args(creds, peer_identity, sock.fileno()),
                pass_fds=(sock.fileno(),),
            )  # fmt: skip
        try:
            nodes = [node_name(i) for i in range(len(files))]
            exports = await nbd_import.export_nodes(daemon, nodes)
        except BaseException:
            await daemon.kill()
            raise
        return QemuImport(daemon, port, exports)

    # -- replica chains --------------------------------------------------------------------

    def chain(self, directory: Path) -> ReplicaChain:
        return ReplicaChain(directory)

    async def create_chain(self, directory: Path, virtual_size: int) -> ReplicaChain:
        return await ReplicaChain.create(directory, virtual_size)

    # -- the agent's own helpers -----------------------------------------------------------------

    def end_leftovers(self, markers: Sequence[Path]) -> list[int]:
        return children.end_leftovers(markers)
