"""Generations of change-tracking bitmaps: how a cycle cuts a delta without ever losing a write.

Each disk tracks writes in bitmap ``vmreplica-G`` of the current generation G (kept in the state
database). A cycle, in one QMP transaction, adds ``vmreplica-(G+1)``, freezes G, and copies G's
clusters into the delta with ``bitmap-mode=never`` so that G keeps its bits whatever happens.
Only once the delta is durably in the pending log and the database says G+1 does the agent drop
G. If anything fails in between, or the agent dies, :func:`settle` folds G+1 back into G and
re-enables it: the next cycle sees every write since the last committed delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmreplica._internal.drivers.qemu import blockjobs, nbd_extents, qemu_img
from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.qmp import QmpCommandError
from vmreplica._internal.files import fsync_dir
from vmreplica.errors import InvalidState, ResyncRequired, StorageError, VmrError

__all__ = [
    "QmpTarget",
    "drop",
    "name",
    "remove_all",
    "rotate",
    "settle",
    "start_from_top",
]

PREFIX = "vmreplica-"
# Bitmaps record writes at the guest's own block size, not the image's 64 KiB cluster, so that a
# cycle can ship a 4 KiB write as 4 KiB (compact.py). A bit covers 4 KiB: 32 KiB of QEMU memory
# per GiB of disk and generation.
GRANULARITY = 4096
JOB_PREFIX = "vmr"
_NAME_RE = re.compile(r"^vmreplica-(\d+)$")

Progress = Callable[[int, int], None]


def name(generation: int) -> str:
    return f"{PREFIX}{generation}"


async def _generations(target: QmpTarget, node: str) -> dict[int, dict[str, Any]]:
    found = await blockjobs.block_nodes(target, [node])
    out: dict[int, dict[str, Any]] = {}
    for bitmap in found[node].get("dirty-bitmaps") or []:
        match = _NAME_RE.match(str(bitmap.get("name")))
        if match:
            out[int(match.group(1))] = bitmap
    return out


async def _clear_leftovers(target: QmpTarget) -> None:
    """Jobs, NBD exports and nodes a dead agent left in a QEMU that outlived it."""
    jobs = await target.execute("query-block-jobs")
    for job in jobs if isinstance(jobs, list) else []:
        device = str(job.get("device", ""))
        if device.startswith(f"{JOB_PREFIX}-"):
            with target.subscribe(blockjobs.END_EVENTS) as events:
                stale = blockjobs.Job(str(job.get("device")), Path(), device, "")
                await asyncio.wait_for(blockjobs.cancel_jobs(target, events, [stale]), 60)
    await nbd_extents.clear_leftovers(target)
    nodes = await target.execute("query-named-block-nodes", {"flat": True})
    for node in nodes if isinstance(nodes, list) else []:
        node_name = str(node.get("node-name", ""))
        # Copy targets (vmr-tN), compaction's source (vmr-coarse) and range copies' (vmr-cN).
        if re.fullmatch(rf"{JOB_PREFIX}-(t\d+|c\d+|coarse)", node_name):
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": node_name})


async def settle(target: QmpTarget, nodes: Sequence[str], generation: int) -> None:
    """Bring every disk back to exactly one recording bitmap, of ``generation``, losing nothing.

    Older generations belong to deltas already committed and are dropped; a newer one is what an
    uncommitted cycle started, and its bits are merged back. A missing or inconsistent bitmap of
    the committed generation cannot be trusted: :class:`ResyncRequired`.
    """
    await _clear_leftovers(target)
    current = name(generation)
    for node in nodes:
        gens = await _generations(target, node)
        mine = gens.get(generation)
        if mine is None or mine.get("inconsistent"):
            why = (
                "is missing"
                if mine is None
                else "is inconsistent (the disk was not closed cleanly)"
            )
            raise ResyncRequired(
                f"change tracking of {node} was lost (bitmap {current} {why}): a resynchronization is required"
            )
        newer = [g for g in gens if g > generation]
        if newer:
            sources = [name(g) for g in newer]
            await target.execute(
                "block-dirty-bitmap-merge", {"node": node, "target": current, "bitmaps": sources}
            )
        if not mine.get("recording"):
            await target.execute("block-dirty-bitmap-enable", {"node": node, "name": current})
        for g in gens:
            if g != generation:
                await target.execute("block-dirty-bitmap-remove", {"node": node, "name": name(g)})


async def rotate(target: QmpTarget, nodes: Sequence[str], generation: int, dests: Sequence[Path],
                 progress: Progress | None = None) -> list[int]:  # fmt: skip
    """Cut the delta of ``generation`` into ``dests`` and start ``generation + 1`` at that instant.

    ``sync=bitmap`` with ``bitmap-mode=never`` (``incremental`` insists on ``on-success``) keeps
    generation G's bits whatever the copy does; on failure the new generation is folded back at
    once (and by :func:`settle` if the agent died meanwhile). Returns the bytes each copy covered:
    the backup job works in 64 KiB clusters whatever the bitmap's granularity.
    """
    current, following = name(generation), name(generation + 1)

    def actions(job: blockjobs.Job) -> list[dict[str, object]]:
        return [
            {"type": "block-dirty-bitmap-add", "data": {
                "node": job.node, "name": following, "persistent": True, "granularity": GRANULARITY,
            }},
            {"type": "block-dirty-bitmap-disable", "data": {"node": job.node, "name": current}},
            {"type": "blockdev-backup", "data": {
                "job-id": job.job_id, "device": job.node, "target": job.target_node,
                "sync": "bitmap", "bitmap": current, "bitmap-mode": "never",
            }},
        ]  # fmt: skip

    try:
        return await _copy(target, nodes, dests, actions, progress)
    except BaseException:
        with contextlib.suppress(VmrError):
            await settle(target, nodes, generation)
        raise


async def start_from_top(target: QmpTarget, nodes: Sequence[str], dests: Sequence[Path]) -> None:
    """After a failover: what the VM wrote into its overlays since the failover point (only the
    top image's clusters), and generation 1 of tracking from that same instant."""
    await remove_all(target, nodes)

    def actions(job: blockjobs.Job) -> list[dict[str, object]]:
        return [
            {"type": "block-dirty-bitmap-add", "data": {
                "node": job.node, "name": name(1), "persistent": True, "granularity": GRANULARITY,
            }},
            {"type": "blockdev-backup", "data": {
                "job-id": job.job_id, "device": job.node, "target": job.target_node, "sync": "top",
            }},
        ]  # fmt: skip

    try:
        await _copy(target, nodes, dests, actions, None)
    except BaseException:
        with contextlib.suppress(VmrError):
            await remove_all(target, nodes)
        raise


async def _copy(
    target: QmpTarget,
    nodes: Sequence[str],
    dests: Sequence[Path],
    actions_for: Callable[[blockjobs.Job], list[dict[str, object]]],
    progress: Progress | None,
) -> list[int]:
    """One transaction of block jobs into new standalone qcow2 files; all or nothing. Returns
    the bytes each job covered."""
    found = await blockjobs.block_nodes(target, nodes)
    jobs = [
        blockjobs.Job(node, Path(dest).absolute(), f"{JOB_PREFIX}-j{i}", f"{JOB_PREFIX}-t{i}")
        for i, (node, dest) in enumerate(zip(nodes, dests, strict=True))
    ]
    for job in jobs:
        # Never overwrite, and never delete on the way out what this did not make: a wrong
        # path could be a disk or a replica image.
        if job.dest.exists():
            raise InvalidState(f"cannot copy {job.node}: {job.dest} already exists")
    added: list[str] = []
    created: list[Path] = []
    ok = False
    try:
        for job in jobs:
            await qemu_img.create(job.dest, int(found[job.node]["image"]["virtual-size"]))
            created.append(job.dest)
            file = {
                "driver": "file",
                "node-name": f"{job.target_node}-file",
                "filename": str(job.dest),
            }
            await target.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": job.target_node, "file": file}
            )
            added.append(job.target_node)
        actions = [action for job in jobs for action in actions_for(job)]
        with target.subscribe(blockjobs.END_EVENTS) as events:
            try:
                await target.execute("transaction", {"actions": actions})
            except QmpCommandError as exc:
                raise VmrError(f"cannot start the copy of {', '.join(nodes)}: {exc.desc}") from exc
            try:
                await blockjobs.wait_jobs(target, events, jobs, progress)
            except BaseException:
                with contextlib.suppress(VmrError, TimeoutError):
                    await asyncio.wait_for(blockjobs.cancel_jobs(target, events, jobs), 30)
                raise
        # The failure itself, not a sibling's copy it cancelled in turn.
        failed = [job for job in jobs if job.error is not None] or [
            job for job in jobs if job.cancelled
        ]
        if failed:
            job = failed[0]
            reason = job.error or "cancelled"
            full = "No space left" in reason or "quota" in reason.lower()
            prefix = "disk full: " if full else ""
            raise StorageError(f"{prefix}copy of {job.node} into {job.dest} failed: {reason}")
        ok = True
    finally:
        for node_name in added:
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": node_name})
        if not ok:
            for path in created:
                path.unlink(missing_ok=True)
    for parent in sorted({job.dest.parent for job in jobs}):
        fsync_dir(parent)
    return [job.length for job in jobs]


async def drop(target: QmpTarget, nodes: Sequence[str], generation: int) -> None:
    """After the commit: the old generation's changes are safe in the pending log."""
    for node in nodes:
        with contextlib.suppress(QmpCommandError):
            await target.execute(
                "block-dirty-bitmap-remove", {"node": node, "name": name(generation)}
            )


async def remove_all(target: QmpTarget, nodes: Sequence[str]) -> None:
    for node in nodes:
        for g in await _generations(target, node):
            await target.execute("block-dirty-bitmap-remove", {"node": node, "name": name(g)})
