"""A delta of small writes, cut down to the blocks the guest wrote.

The backup job that cuts a delta (tracking.rotate) copies whole 64 KiB clusters: QEMU 7.2's
block-copy never works in smaller units, whatever the bitmap's granularity. A guest writing 4 KiB
blocks at random (a database, a journal) would then ship 16 bytes for each byte it wrote. The
bitmap itself records 4 KiB blocks (tracking.GRANULARITY), and after the cut it is still there,
frozen, until the delta is committed. So, when the guest's blocks are a small part of the
clusters copied, the delta is rewritten as a qcow2 image of 4 KiB clusters holding exactly those
blocks, read from the delta itself (never from the live disk, which has moved on).

Nothing changes for the replica: it commits any qcow2 delta into its tip, and a 4 KiB cluster
written into tip's 64 KiB cluster takes the rest from the image below. The rewrite is an
optimisation only: if any step of it fails, the delta as cut is shipped instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from vmreplica._internal.drivers.qemu import blockjobs, nbd_extents, qemu_img, tracking
from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.files import fsync_dir
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.compact")

WORTH_IT = 0.5
"""Rewrite when the guest's blocks are at most this part of the clusters the backup copied: a
sequential write fills its clusters, and rewriting it would only cost a second copy."""

_SUFFIX = ".fine"
_NODE = "vmr-coarse"


def worth_it(dirty_bytes: int, copied_bytes: int) -> bool:
    return 0 < dirty_bytes <= WORTH_IT * copied_bytes


async def compact(
    target: QmpTarget,
    nodes: Sequence[str],
    generation: int,
    dests: Sequence[Path],
    copied: Sequence[int],
    socket: Path,
) -> int:
    """Rewrite each delta of ``dests`` that is mostly padding; returns the bytes saved.

    Must run after :func:`tracking.rotate` and before the generation is dropped, on the session
    that cut it. Never raises a :class:`VmrError`: a failed rewrite leaves the delta as cut.
    """
    bitmap = tracking.name(generation)
    try:
        statuses = await blockjobs.bitmap_status(target, nodes, bitmap)
    except VmrError as e:
        log.warning("not compacting the delta of %s: %s", ", ".join(nodes), e.message)
        return 0
    saved = 0
    for i, status in enumerate(statuses):
        if not worth_it(status.dirty_bytes, copied[i]):
            continue
        try:
            await _rewrite(target, status.node, bitmap, Path(dests[i]).absolute(), socket)
        except VmrError as e:
            log.warning("shipping the delta of %s as cut: %s", status.node, e.message)
            continue
        saved += copied[i] - status.dirty_bytes
    return saved


async def _rewrite(target: QmpTarget, node: str, bitmap: str, dest: Path, socket: Path) -> None:
    (blocks,) = await nbd_extents.dirty_extents(target, [node], bitmap, socket)
    fine = dest.with_name(dest.name + _SUFFIX)
    fine.unlink(missing_ok=True)
    size = int((await blockjobs.block_nodes(target, [node]))[node]["image"]["virtual-size"])
    await qemu_img.create(fine, size, cluster_size=tracking.GRANULARITY)
    done = False
    try:
        file = {"driver": "file", "node-name": f"{_NODE}-file", "filename": str(dest)}
        await target.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": _NODE, "file": file, "read-only": True},
        )
        try:
            await nbd_extents.copy_ranges(target, [_NODE], [fine], {0: blocks}, socket)
        finally:
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": _NODE})
        os.replace(fine, dest)
        done = True
        fsync_dir(dest.parent)
    finally:
        if not done:
            fine.unlink(missing_ok=True)
