"""What the block jobs of replication share, on a running VM's QEMU or a qemu-storage-daemon.

Both hold the disks as format nodes ``diskN``, so the same QMP commands serve a VM that runs and
one that is off (:class:`QmpTarget`). The jobs themselves are started elsewhere: a cycle's delta
in :mod:`~vmreplica._internal.drivers.qemu.tracking`, the fleecing of an initial copy in
:mod:`~vmreplica._internal.drivers.qemu.nbd_copy`. Here is what they have in common: the nodes
(:func:`block_nodes`) and a bitmap's state in memory (:func:`bitmap_status`), waiting for a set
of jobs (:func:`wait_jobs`) and cancelling them (:func:`cancel_jobs`), and :func:`fsync_dir`.
What QEMU 7.2 does here, checked on this machine:

- Jobs keep QEMU's defaults (auto-finalize, auto-dismiss), so each ends with one event,
  ``BLOCK_JOB_COMPLETED`` (carrying ``error`` if it failed) or ``BLOCK_JOB_CANCELLED``;
  ``BLOCK_JOB_ERROR`` may come before it. Events of jobs not waited for are ignored.
- ``block-dirty-bitmap-add`` refuses ``completion-mode: grouped`` in a transaction, so one job
  failing leaves the others running: :func:`wait_jobs` cancels them.
- ``blockdev-del`` of a target fdatasyncs it; its parent directory must be fsynced too
  (:func:`fsync_dir`) for the new name to be durable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmreplica._internal.drivers.qemu.qmp import EventSubscription, QmpCommandError
from vmreplica.errors import NotFound

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


async def bitmap_status(target: QmpTarget, nodes: Sequence[str], bitmap: str) -> list[BitmapStatus]:
    """The bitmap as QEMU holds it now: ``qemu-img info`` cannot see an open image's state."""
    found = await block_nodes(target, nodes)
    return [_status(node, found[node], bitmap) for node in nodes]


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
            continue  # the job goes on, or ends with the error in its end event
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
