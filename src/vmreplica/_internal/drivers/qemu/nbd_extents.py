"""Byte ranges of block nodes over NBD: which ranges a dirty bitmap marks, and copying chosen
ranges from one node into another, on a running QEMU or a qemu-storage-daemon.

A delta failback needs both, and QMP offers neither: no command lists a bitmap's dirty ranges,
and a block job copies whole images or what a bitmap says, while no command sets bits. The
block layer's own NBD server does both, read through libnbd. What QEMU 7.2 and libnbd 1.14 do
here, checked on this machine:

- ``nbd-server-start`` takes the legacy socket address, ``{"type": "unix", "data": {"path":
  ...}}``; without ``data`` it is refused ("Parameter 'addr.data' is missing").
- ``block-export-add`` refuses to export an enabled (recording) bitmap read-only ("Enabled
  bitmap ... incompatible with readonly export"), so the bitmap is disabled while it is read
  and enabled again afterwards.
- The ``qemu:dirty-bitmap:NAME`` context defines one flag: bit 0 (value 1), dirty. Extents come
  at the bitmap's granularity. libnbd calls back with ``(metacontext, offset, entries, error)``,
  ``entries`` a flat list ``[length, flags, length, flags, ...]``; a reply may cover less than
  was asked, so the reads go on from where the last one ended.
- ``NBD_CMD_WRITE_ZEROES`` on a qcow2 node sets zero clusters even in an image without a backing
  file, so a range copied as zeros still shadows what lies below once the image is rebased.
- ``block-export-del`` returns while the export still exists (it waits for its clients), and the
  node stays in use until ``BLOCK_EXPORT_DELETED``; closing a node any earlier is refused.

libnbd's calls block, so each connection runs in a worker thread (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbd

from vmreplica._internal.drivers.qemu import blockjobs
from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.qmp import EventSubscription
from vmreplica._internal.extents import Extent, align, coalesce
from vmreplica._internal.files import fsync_dir
from vmreplica.errors import StorageError, VmrError

__all__ = [
    "Extent",
    "align",
    "clear_leftovers",
    "coalesce",
    "copy_between",
    "copy_ranges",
    "dirty_extents",
    "read_dirty",
    "writable_exports",
]


DIRTY = 1  # bit 0 of a qemu:dirty-bitmap context's extent flags
_STATUS_CHUNK = 1 << 30  # block status requests must stay below 4 GiB
_COPY_CHUNK = 4 << 20  # QEMU's NBD server takes requests up to 32 MiB
_EXPORT_TIMEOUT = 30.0
_PREFIX = "vmr-nbd"


async def clear_leftovers(target: QmpTarget) -> None:
    """Exports and the NBD server an agent killed mid-read left in a QEMU that outlived it.

    An export of a bitmap keeps that bitmap busy (no merge, enable or removal), which would
    stop every later cycle of the VM.
    """
    exports = await target.execute("query-block-exports")
    stale = [
        str(e["id"])
        for e in (exports if isinstance(exports, list) else [])
        if isinstance(e, dict) and str(e.get("id", "")).startswith(f"{_PREFIX}-")
    ]
    for name in stale:
        with (
            contextlib.suppress(VmrError, TimeoutError),
            target.subscribe(("BLOCK_EXPORT_DELETED",)) as events,
        ):
            await target.execute("block-export-del", {"id": name, "mode": "hard"})
            await asyncio.wait_for(_deleted(events, name), _EXPORT_TIMEOUT)
    if stale:
        with contextlib.suppress(VmrError):
            await target.execute("nbd-server-stop")


@contextlib.asynccontextmanager
async def _server(target: QmpTarget, socket: Path) -> AsyncIterator[str]:
    """An NBD server on a unix socket (never TCP: nothing but this process may connect)."""
    socket.unlink(missing_ok=True)  # left by a daemon that was killed
    await target.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket)}}}
    )
    try:
        yield str(socket)
    finally:
        with contextlib.suppress(VmrError):
            await target.execute("nbd-server-stop")
        socket.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _export(
    target: QmpTarget, node: str, *, writable: bool, bitmap: str | None = None
) -> AsyncIterator[str]:
    """Export ``node`` under its own name; gone (and the node free again) once this exits."""
    name = f"{_PREFIX}-{node}"
    args: dict[str, object] = {
        "type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable,
    }  # fmt: skip
    if bitmap is not None:
        args["bitmaps"] = [bitmap]
    await target.execute("block-export-add", args)
    try:
        yield name
    finally:
        with (
            contextlib.suppress(VmrError, TimeoutError),
            target.subscribe(("BLOCK_EXPORT_DELETED",)) as events,
        ):
            await target.execute("block-export-del", {"id": name})
            await asyncio.wait_for(_deleted(events, name), _EXPORT_TIMEOUT)


async def _deleted(events: EventSubscription, name: str) -> None:
    while True:
        event = await events.get(None)
        if event is not None and event.data.get("id") == name:
            return


def _connect(handle: Any, socket: str, export: str, context: str | None = None) -> None:
    if context is not None:
        handle.add_meta_context(context)
    handle.set_export_name(export)
    handle.connect_unix(socket)


def read_dirty(socket: str, export: str, bitmap: str) -> list[Extent]:
    """The dirty ranges of ``bitmap`` on ``export``, the whole disk long; in a worker thread.
    (libvirt's pull-mode backups export theirs as ``backup-<disk>``: drivers/libvirt.)"""
    context = f"qemu:dirty-bitmap:{bitmap}"
    handle = nbd.NBD()
    try:
        _connect(handle, socket, export, context)
        if not handle.can_meta_context(context):
            raise VmrError(f"the NBD export of {export} does not offer {context}")
        size = int(handle.get_size())
        dirty: list[Extent] = []
        replies: list[list[int]] = []

        def extent(metacontext: str, _offset: int, entries: list[int], _error: object) -> int:
            if metacontext == context:
                replies.append([int(x) for x in entries])
            return 0

        offset = 0
        while offset < size:
            replies.clear()
            handle.block_status(min(size - offset, _STATUS_CHUNK), offset, extent)
            if not replies:
                raise VmrError(f"the NBD server sent no status of {context} at offset {offset}")
            entries = replies[0]  # a buggy server may call back twice: one reply per request
            if len(entries) % 2:
                raise VmrError(f"the NBD server sent a malformed status of {context}")
            position = offset
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                if flags & DIRTY:
                    dirty.append((position, min(length, size - position)))
                position += length
            if position <= offset:
                raise VmrError(f"the NBD server sent an empty status of {context} at {offset}")
            offset = position
        handle.shutdown()
        return coalesce(dirty)
    except nbd.Error as exc:
        raise VmrError(f"reading bitmap {bitmap} of {export} over NBD failed: {exc}") from exc
    finally:
        del handle


async def dirty_extents(
    target: QmpTarget, nodes: Sequence[str], bitmap: str, socket: Path
) -> list[list[Extent]]:
    """Per node, the ranges ``bitmap`` marks dirty, coalesced.

    A recording bitmap is disabled for the read and enabled again afterwards, whatever happens:
    nothing may write to the node meanwhile, or those writes would be tracked nowhere (callers
    read the disks of a VM that is off, through a storage daemon that only they use).
    """
    found = await blockjobs.bitmap_status(target, nodes, bitmap)
    result: list[list[Extent]] = []
    async with _server(target, socket) as path:
        for status in found:
            if status.recording:
                await target.execute(
                    "block-dirty-bitmap-disable", {"node": status.node, "name": bitmap}
                )
            try:
                async with _export(target, status.node, writable=False, bitmap=bitmap) as name:
                    result.append(await asyncio.to_thread(read_dirty, path, name, bitmap))
            finally:
                if status.recording:
                    await target.execute(
                        "block-dirty-bitmap-enable", {"node": status.node, "name": bitmap}
                    )
    return result


def copy_between(
    src_socket: str,
    source: str,
    dst_socket: str,
    dest: str,
    extents: Sequence[Extent],
    cluster: int,
) -> int:
    """Copy ``extents`` from export ``source`` into ``dest``, each on its server's socket; in a
    worker thread.

    Clusters that read as zeros are written as zero clusters, so the copy stays sparse; they must
    still be written, since in the replica they replace data. Returns the bytes copied.
    """
    src, dst = nbd.NBD(), nbd.NBD()
    zeros = bytes(cluster)
    try:
        _connect(src, src_socket, source)
        _connect(dst, dst_socket, dest)
        copied = 0
        for offset, length in extents:
            end = offset + length
            while offset < end:
                count = min(_COPY_CHUNK, end - offset)
                data = src.pread(count, offset)
                run_start, run_zero = 0, None
                for at in range(0, count, cluster):
                    piece = data[at : at + cluster]
                    zero = piece == zeros[: len(piece)]
                    if run_zero is not None and zero != run_zero:
                        _write(dst, data, offset, run_start, at, run_zero)
                        run_start = at
                    run_zero = zero
                _write(dst, data, offset, run_start, count, bool(run_zero))
                copied += count
                offset += count
        dst.flush()
        src.shutdown()
        dst.shutdown()
        return copied
    except nbd.Error as exc:
        raise StorageError(
            f"copying ranges of {source} into {dest} over NBD failed: {exc}"
        ) from exc
    finally:
        del src, dst


def _write(dst: Any, data: bytes, base: int, start: int, end: int, zero: bool) -> None:
    if end <= start:
        return
    if zero:
        dst.zero(end - start, base + start)
    else:
        dst.pwrite(data[start:end], base + start)


async def copy_ranges(
    target: QmpTarget,
    nodes: Sequence[str],
    dests: Sequence[Path],
    extents: Mapping[int, Sequence[Sequence[int]]],
    socket: Path,
) -> int:
    """Copy ``extents[n]`` of node ``nodes[n]`` into the qcow2 file ``dests[n]``, in place.

    Each file is opened as a node of ``target`` for the copy, ranges widened to its clusters
    (:func:`align`), then closed again: ``blockdev-del`` fdatasyncs it, and the directories are
    fsynced after. The sources must not change meanwhile (a VM that is off). Returns the bytes
    copied.
    """
    work = [
        (n, node, Path(dest).absolute())
        for n, (node, dest) in enumerate(zip(nodes, dests, strict=True))
        if extents.get(n)
    ]
    if not work:
        return 0
    copied = 0
    added: list[str] = []
    try:
        async with _server(target, socket) as path:
            for n, node, dest in work:
                dest_node = f"vmr-c{n}"
                file = {"driver": "file", "node-name": f"{dest_node}-file", "filename": str(dest)}
                await target.execute(
                    "blockdev-add", {"driver": "qcow2", "node-name": dest_node, "file": file}
                )
                added.append(dest_node)
                info = (await blockjobs.block_nodes(target, [dest_node]))[dest_node]["image"]
                cluster = int(info.get("cluster-size") or 65536)
                ranges = align(extents[n], cluster, int(info["virtual-size"]))
                async with (
                    _export(target, node, writable=False) as source,
                    _export(target, dest_node, writable=True) as sink,
                ):
                    copied += await asyncio.to_thread(
                        copy_between, path, source, path, sink, ranges, cluster
                    )
        while added:  # blockdev-del flushes (fdatasync) and closes the file
            await target.execute("blockdev-del", {"node-name": added[-1]})
            added.pop()
    finally:
        for dest_node in added:
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": dest_node})
    for parent in sorted({dest.parent for _, _, dest in work}):
        fsync_dir(parent)
    return copied


@contextlib.asynccontextmanager
async def writable_exports(
    target: QmpTarget, nodes: Sequence[str], socket: Path
) -> AsyncIterator[tuple[str, list[tuple[str, int, int]]]]:
    """``nodes`` of ``target`` (new qcow2 files open in a storage daemon) exported writable on
    ``socket``: yields the socket and (export, cluster size, virtual size) per node."""
    found = await blockjobs.block_nodes(target, nodes)
    async with _server(target, socket) as path, contextlib.AsyncExitStack() as stack:
        out = []
        for node in nodes:
            name = await stack.enter_async_context(_export(target, node, writable=True))
            image = found[node]["image"]
            out.append((name, int(image.get("cluster-size") or 65536), int(image["virtual-size"])))
        yield path, out
