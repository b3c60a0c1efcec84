"""The block jobs of a replication cycle, on a running VM's QEMU or a qemu-storage-daemon.

Both hold the disks as format nodes ``diskN``, so the same QMP commands serve a VM that runs and
one that is off (:class:`QmpTarget`). What QEMU 7.2 does here, checked on this machine:

- ``block-dirty-bitmap-add`` refuses ``completion-mode: grouped``, so the full copy's transaction
  uses the default ("individual") mode. The transaction still starts the bitmap and the copy at
  one instant. Once it is accepted the bitmaps stay, even if a copy job fails later, and a
  bitmap still reading "nothing changed" after a failed copy would be trusted wrongly. So a
  failed full copy cancels its other jobs and removes every bitmap it added.
- Incremental copies use ``grouped``: one job failing cancels the others, and no bitmap is
  cleared. Each bitmap keeps its bits plus the writes that came in meanwhile, so a retry loses
  nothing.
- ``blockdev-backup sync=full`` reads through the backing chain, so a differencing disk is copied
  complete. Regions that read as zero are not written, so the copy is sparse without any option.
- ``blockdev-del`` of a target fdatasyncs it, and each parent directory is fsynced here after
  that so the new names are durable too.
- A bitmap of a disk that QEMU did not close cleanly comes back ``inconsistent`` (and does not
  record). One added since the last clean close comes back missing. Either way it cannot be
  trusted, and :class:`~vmreplica.errors.ResyncRequired` says so.

Jobs keep QEMU's defaults (auto-finalize, auto-dismiss). Ids carry ``job_prefix``, so the jobs
and target nodes of several VMs on one daemon never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica._internal.drivers.qemu.qmp import EventSubscription, QmpCommandError
from vmreplica.errors import (
    Interrupted,
    InvalidArgument,
    InvalidState,
    NotFound,
    ResyncRequired,
    StorageError,
    VmrError,
)

BITMAP = "vmreplica"
_POLL = 0.2
END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")

Progress = Callable[[int, int], None]


class QmpTarget(Protocol):
    """A running QEMU or qemu-storage-daemon holding the disks as nodes ``diskN``."""

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = 60.0
    ) -> object: ...

    def subscribe(self, names: tuple[str, ...] | None = None) -> EventSubscription: ...


@dataclass(frozen=True)
class BitmapStatus:
    node: str
    present: bool
    inconsistent: bool
    recording: bool
    dirty_bytes: int


@dataclass
class Job:
    node: str
    dest: Path
    job_id: str
    target_node: str
    offset: int = 0
    length: int = 0
    ended: bool = False
    cancelled: bool = False
    error: str | None = None
    operation: str | None = None  # "read" (the disk) or "write" (the copy) of the first error


async def block_nodes(target: QmpTarget, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """query-named-block-nodes entries of ``nodes``; a missing node is a caller bug or a gone disk."""
    result = await target.execute("query-named-block-nodes", {"flat": True})
    found = {
        str(n["node-name"]): n
        for n in (result if isinstance(result, list) else [])
        if isinstance(n, dict) and n.get("node-name") in nodes
    }
    if missing := [node for node in nodes if node not in found]:
        raise NotFound(f"no block node '{missing[0]}' is open")
    return found


def _status(node: str, info: Mapping[str, Any], bitmap: str) -> BitmapStatus:
    for b in info.get("dirty-bitmaps") or []:
        if b.get("name") == bitmap:
            inconsistent, recording = bool(b.get("inconsistent")), bool(b.get("recording"))
            return BitmapStatus(node, True, inconsistent, recording, int(b.get("count", 0)))
    return BitmapStatus(node, False, False, False, 0)


async def bitmap_status(
    target: QmpTarget, nodes: Sequence[str], bitmap: str = BITMAP
) -> list[BitmapStatus]:
    """The bitmap as QEMU holds it now: ``qemu-img info`` cannot see an open image's state."""
    found = await block_nodes(target, nodes)
    return [_status(node, found[node], bitmap) for node in nodes]


async def remove_bitmaps(target: QmpTarget, nodes: Sequence[str], bitmap: str = BITMAP) -> None:
    """Drop the bitmap from memory and from the image; nodes without it are skipped."""
    for status in await bitmap_status(target, nodes, bitmap):
        if status.present:
            await target.execute("block-dirty-bitmap-remove", {"node": status.node, "name": bitmap})


def _check_tracking(statuses: Sequence[BitmapStatus], bitmap: str) -> None:
    """Refuse a bitmap that may have missed writes: a delta from it would silently lose data."""
    for s in statuses:
        if not s.present:
            why = f"bitmap '{bitmap}' is missing: QEMU did not store it at exit"
        elif s.inconsistent:
            why = f"bitmap '{bitmap}' is inconsistent: the disk was not closed cleanly"
        elif not s.recording:
            why = f"bitmap '{bitmap}' is not recording"
        else:
            continue
        raise ResyncRequired(
            f"change tracking of {s.node} was lost ({why}): a resynchronization is required"
        )


async def full_copy_with_tracking(
    target: QmpTarget,
    nodes: Sequence[str],
    dest_files: Sequence[Path],
    bitmap: str = BITMAP,
    progress: Progress | None = None,
    job_prefix: str = "vmr",
) -> None:
    """Copy whole disks into new standalone qcow2 files and start tracking from that instant.

    Any bitmap of that name is removed first: this is the start over after lost tracking. On
    failure no bitmap and no destination file is left, so a retry starts clean.
    """
    await _copy(target, nodes, dest_files, bitmap, progress, job_prefix, full=True)


async def incremental_copy(
    target: QmpTarget,
    nodes: Sequence[str],
    dest_files: Sequence[Path],
    bitmap: str = BITMAP,
    progress: Progress | None = None,
    job_prefix: str = "vmr",
) -> None:
    """Copy the clusters changed since the last copy into new sparse qcow2 files (the delta).

    All disks are copied at one crash-consistent instant. The bitmaps are cleared only if every
    copy succeeds; on failure the destinations are deleted and the bitmaps keep every change.
    Should the copies be lost after the bitmaps were cleared (closing them failed), the bitmaps
    are removed too and ResyncRequired raised, so tracking that misses changes is never used.
    """
    await _copy(target, nodes, dest_files, bitmap, progress, job_prefix, full=False)


async def _copy(
    target: QmpTarget,
    nodes: Sequence[str],
    dest_files: Sequence[Path],
    bitmap: str,
    progress: Progress | None,
    job_prefix: str,
    *,
    full: bool,
) -> None:
    if not nodes or len(nodes) != len(dest_files) or len(set(nodes)) != len(nodes):
        raise InvalidArgument("give one destination file per disk, each disk once")
    found = await block_nodes(target, nodes)
    if not full:
        _check_tracking([_status(n, found[n], bitmap) for n in nodes], bitmap)
    jobs = [
        Job(node, Path(dest).absolute(), f"{job_prefix}-j{i}", f"{job_prefix}-t{i}")
        for i, (node, dest) in enumerate(zip(nodes, dest_files, strict=True))
    ]
    for job in jobs:
        # Never overwrite: a wrong path could be a disk or a replica image.
        if job.dest.exists():
            raise InvalidState(f"cannot copy {job.node}: {job.dest} already exists")
    created: list[Path] = []
    added: list[str] = []
    copied = False
    try:
        if full:
            await remove_bitmaps(target, nodes, bitmap)
        for job in jobs:
            await qemu_img.create(job.dest, int(found[job.node]["image"]["virtual-size"]))
            created.append(job.dest)
            file = {"driver": "file", "filename": str(job.dest)}  # deleted with its parent
            options = {"driver": "qcow2", "node-name": job.target_node, "file": file}
            await target.execute("blockdev-add", options)
            added.append(job.target_node)
        await _run_jobs(target, jobs, bitmap, progress, full)
        copied = True  # and an incremental copy has cleared the bitmaps
        while added:  # blockdev-del flushes (fdatasync) and closes the copy
            await target.execute("blockdev-del", {"node-name": added[-1]})
            added.pop()
        for parent in sorted({job.dest.parent for job in jobs}):
            fsync_dir(parent)
    except BaseException as exc:
        for name in added:
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": name})
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        try:  # Left behind, a bitmap would read "no change since a copy" that is now deleted.
            if full or copied:
                await remove_bitmaps(target, nodes, bitmap)
        except VmrError as cleanup:
            if isinstance(exc, VmrError):
                exc.message += f"; removing bitmap '{bitmap}' failed too ({cleanup})"
        if copied and not full and isinstance(exc, VmrError):
            raise ResyncRequired(
                f"the delta of {', '.join(nodes)} was lost after its change tracking was reset"
                f" ({exc}): a resynchronization is required"
            ) from exc
        raise


async def _run_jobs(
    target: QmpTarget, jobs: list[Job], bitmap: str, progress: Progress | None, full: bool
) -> None:
    """Start all jobs in one transaction and wait until each has ended; raise if any failed."""
    actions: list[dict[str, object]] = []
    for job in jobs:
        sync = {"sync": "full"} if full else {"sync": "incremental", "bitmap": bitmap}
        backup = {"job-id": job.job_id, "device": job.node, "target": job.target_node, **sync}
        if full:
            add = {"node": job.node, "name": bitmap, "persistent": True}
            actions.append({"type": "block-dirty-bitmap-add", "data": add})
        actions.append({"type": "blockdev-backup", "data": backup})
    args: dict[str, object] = {"actions": actions}
    if not full:
        args["properties"] = {"completion-mode": "grouped"}
    what = ", ".join(job.node for job in jobs)
    # Subscribed before the jobs exist, so that no end event can be missed.
    with target.subscribe(END_EVENTS) as events:
        try:
            await target.execute("transaction", args)
        except QmpCommandError as exc:
            raise VmrError(f"cannot start the copy of {what}: {exc.desc}") from exc
        try:
            await wait_jobs(target, events, jobs, progress)
        except BaseException:
            # Cancelled or the monitor failed: stop the copies so the targets can be closed.
            with contextlib.suppress(VmrError, TimeoutError):
                await asyncio.wait_for(cancel_jobs(target, events, jobs), 30.0)
            raise
    if failed := [job for job in jobs if job.error is not None]:
        job, error = failed[0], str(failed[0].error)
        side = "reading the disk" if job.operation == "read" else f"writing {job.dest}"
        message = f"copy of {job.node} failed while {side}: {error}"
        if "No space left" in error or "quota" in error.lower():
            message = "disk full: " + message
        raise StorageError(message)
    if any(job.cancelled for job in jobs):
        raise Interrupted(f"the copy of {what} was cancelled")


async def wait_jobs(
    target: QmpTarget, events: EventSubscription, jobs: list[Job], progress: Progress | None
) -> None:
    by_id = {job.job_id: job for job in jobs}
    loop = asyncio.get_running_loop()
    next_poll = loop.time() + _POLL
    while not all(job.ended for job in jobs):
        event = await events.get(max(0.0, next_poll - loop.time()))
        if event is None:
            next_poll = loop.time() + _POLL
            if progress is not None:
                await _poll(target, by_id)
                progress(sum(j.offset for j in jobs), sum(j.length for j in jobs))
            continue
        job = by_id.get(str(event.data.get("device")))
        if job is None or job.ended:
            continue  # another VM's job on the same daemon
        if event.name == "BLOCK_JOB_ERROR":
            job.operation = job.operation or str(event.data.get("operation"))
            continue
        job.ended = True
        job.offset, job.length = _int(event.data.get("offset")), _int(event.data.get("len"))
        job.cancelled = event.name == "BLOCK_JOB_CANCELLED"
        if "error" in event.data:
            job.error = str(event.data["error"])
        if job.error is not None or job.cancelled:
            # Grouped completion cancels the others already; individual lets them run on.
            await _request_cancel(target, jobs)
    if progress is not None:
        progress(sum(j.offset for j in jobs), sum(j.length for j in jobs))


async def _poll(target: QmpTarget, by_id: Mapping[str, Job]) -> None:
    result = await target.execute("query-block-jobs")
    for info in result if isinstance(result, list) else []:
        job = by_id.get(str(info.get("device")))
        if job is not None and not job.ended:
            job.offset, job.length = _int(info.get("offset")), _int(info.get("len"))


async def cancel_jobs(target: QmpTarget, events: EventSubscription, jobs: list[Job]) -> None:
    """Cancel the jobs still running and wait until QEMU reports each one ended."""
    await _request_cancel(target, jobs)
    running = {job.job_id for job in jobs if not job.ended}
    while running:
        event = await events.get(None)
        if event is not None and event.name != "BLOCK_JOB_ERROR":
            running.discard(str(event.data.get("device")))


async def _request_cancel(target: QmpTarget, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.ended:
            with contextlib.suppress(QmpCommandError):  # it ended meanwhile
                await target.execute("block-job-cancel", {"device": job.job_id})


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot sync directory {path}: {exc.strerror}") from exc
