"""Sending the pending log to the replica, oldest delta first, each acknowledged before it
leaves the log; what the replica says it already has leaves without being sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.engine.connect import replica_address
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.throttle import Throttle
from vmreplica._internal.files import off_loop
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import delta_resume
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica._internal.transport.peer import open_peer

log = logging.getLogger("vmreplica.primary")
MEASURED = 0.5  # seconds: a body that took as long tells the link's rate


class _Counted:
    """Counts what a delta's request body yields: the bytes on the wire, TLS aside; and times
    its pieces: how long the sender waited for them (reading and compressing) against the whole
    stream (the link's share is the rest)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.waited = self.began = self.ended = 0.0
        self.out = asyncio.Event()  # the whole body has left

    async def through(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.began = time.monotonic()
        async for chunk in chunks:
            got = time.monotonic()
            self.waited += got - (self.ended or self.began)
            self.bytes += len(chunk)
            yield chunk
            self.ended = time.monotonic()
        self.out.set()

    def link_bound_rate(self) -> float | None:
        """Bytes per second, if the stream was long enough to tell and the link, not the
        reading and compressing, held it back (the sender waited for pieces under a fifth of
        the time); else None."""
        span = self.ended - self.began
        if span < MEASURED or self.waited > span / 5:
            return None
        return self.bytes / span


@dataclass
class _Flight:
    """A delta under way: its request, and what to record once it is answered."""

    sequence: int
    delta_dir: Path
    size: int
    counted: _Counted
    task: asyncio.Future[Any]


class Sender:
    def __init__(self, ctx: Context, pending: PendingLog, throttle: Throttle) -> None:
        self._ctx = ctx
        self._pending = pending
        self._throttle = throttle
        self._slow: dict[str, bool] = {}  # per VM: whether its last long delta found the link slow

    def _level(self, vm_id: str) -> int:
        """zstd's level: a higher one when the link is slow (capped so, or measured so while
        the compressor kept ahead of it); the CPU waits for such a link anyway."""
        cap = self._throttle.copy_rate(vm_id)
        slow = 0 < cap < wire.SLOW_LINK or self._slow.get(vm_id, False)
        return wire.SLOW_LINK_LEVEL if slow else wire.ZSTD_LEVEL

    async def send(
        self, row: ReplicationRow, started: datetime, missed: int = 0, pipelined: bool = False
    ) -> None:
        """Send every committed delta of the pending log, oldest first, each acknowledged (and
        recorded here) in order. ``pipelined``: the next delta starts on a second connection as
        soon as this one's body is out, so that the link carries it while the replica finishes
        the last one (a resynchronization, whose replica answers before it applies); one more
        delta found committed meanwhile is sent too."""
        peer = replica_address(self._ctx.config, row)
        async with (
            self._ctx.locks.send(row.vm_id),
            open_peer(peer, self._ctx.config.credentials, timeout=60.0) as replica,
        ):
            settings = p.SettingsBody(**row.settings.to_json())
            status = await replica.status(p.StatusRequest(row.vm_id, settings))
            self._acknowledged(row.vm_id, status.sequence)
            flights: list[_Flight] = []
            last = status.sequence
            # Without pipelining, what was committed when it began (the next call sends more).
            upto = None if pipelined else max((s for s, _ in self._pending.entries(row.vm_id)),
                                              default=0)  # fmt: skip
            try:
                while True:
                    entry = self._next(row.vm_id, last, status.sequence, upto)
                    if entry is None:
                        if not flights:
                            break
                        # Pipelined: the last one's answer, or a delta committed meanwhile.
                        await asyncio.wait([flights[0].task], timeout=0.1)
                        if flights[0].task.done():
                            await self._land(row, flights.pop(0), started, missed)
                            missed = 0
                        continue
                    sequence, delta_dir, manifest = entry
                    faults.hit("primary.before_send")
                    if flights:  # the last one's body is out, its answer not yet in hand
                        faults.hit("primary.pipelined_send")
                    counted = _Counted()
                    start = _resumable(status.resume, sequence, manifest)
                    if start is not None:
                        log.info("resuming delta %d of %s at disk %d, byte %d (the replica "
                                 "kept what it had of a cut stream)", sequence, row.vm_name,
                                 start.disk, start.offset)  # fmt: skip
                    stream = wire.iter_stream(delta_dir, manifest, start, self._level(row.vm_id))
                    body = counted.through(self._throttle.stream(row.vm_id, stream))
                    task = asyncio.ensure_future(replica.delta(row.vm_id, body, start))
                    size = sum(d.file_size for d in manifest.disks)
                    flights.append(_Flight(sequence, delta_dir, size, counted, task))
                    last = sequence
                    if pipelined:  # until its body is out; the one before lands when answered
                        out = asyncio.ensure_future(counted.out.wait())
                        try:
                            while not (out.done() or task.done()):
                                before = [flights[0].task] if len(flights) > 1 else []
                                await asyncio.wait([task, out, *before],
                                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                                if before and before[0].done():
                                    await self._land(row, flights.pop(0), started, missed)
                                    missed = 0
                        finally:
                            out.cancel()
                        self._measure(row.vm_id, counted)  # for the next one, already
                    # At most two in flight: the one before lands before the next one leaves.
                    while flights and (len(flights) > 1 or not pipelined or flights[0].task.done()):
                        await self._land(row, flights.pop(0), started, missed)
                        missed = 0
            finally:
                for flight in flights:  # after a failure: what is still under way stops
                    flight.task.cancel()
                    with contextlib.suppress(BaseException):
                        await flight.task

    def _next(
        self, vm_id: str, last: int, applied: int, upto: int | None
    ) -> tuple[int, Path, wire.DeltaManifest] | None:
        """The first committed delta after ``last`` (and not after ``upto``); those the replica
        has (up to ``applied``) leave the log."""
        for sequence, delta_dir in self._pending.entries(vm_id):
            if sequence <= applied:
                shutil.rmtree(delta_dir, ignore_errors=True)
                continue
            if sequence <= last:
                continue
            if upto is not None and sequence > upto:
                return None
            manifest = self._pending.manifest(delta_dir)
            if manifest is None:
                continue  # not committed: its generation still holds the changes
            return sequence, delta_dir, manifest
        return None

    def _acknowledged(self, vm_id: str, held: int) -> None:
        """The replica holds up to ``held``: deltas whose answers were lost (a cut link, a
        kill -9 before they were recorded) are acknowledged by it, as the log drops them."""
        current = self._ctx.stores.replications.find(vm_id)
        if current is not None and current.acked_sequence < held <= current.sequence:
            self._ctx.stores.replications.update(vm_id, acked_sequence=held)

    def _measure(self, vm_id: str, counted: _Counted) -> None:
        """Whether the link is slow, from a body that went out (a long enough one)."""
        if counted.out.is_set() and counted.ended - counted.began >= MEASURED:
            rate = counted.link_bound_rate()
            self._slow[vm_id] = rate is not None and rate < wire.SLOW_LINK

    async def _land(self, row: ReplicationRow, flight: _Flight, started: datetime,
                    missed: int) -> None:  # fmt: skip
        """Its answer, then the acknowledgement recorded and the delta out of the log."""
        await flight.task
        faults.hit("primary.before_land")  # answered, not yet recorded here
        counted = flight.counted
        self._measure(row.vm_id, counted)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.replications.update(
                row.vm_id, tx, acked_sequence=flight.sequence, last_replication_time=now_iso(),
                last_replication_size=flight.size, send_failure=None, last_error=None,
            )  # fmt: skip
            self._ctx.stores.cycles.record(
                tx, row.vm_id, started.isoformat(), True, flight.sequence, flight.size, missed,
                wire=counted.bytes,
            )  # fmt: skip
        await off_loop(shutil.rmtree, flight.delta_dir, True)  # ignore_errors


def _resumable(
    kept: ResumePoint | None, sequence: int, manifest: wire.DeltaManifest
) -> ResumePoint | None:
    """The replica's resume point, if it is of this very delta (the same manifest)."""
    if kept is None or kept.sequence != sequence:
        return None
    if kept.manifest != delta_resume.digest(manifest.to_json()):
        return None
    disks = {d.index: d.file_size for d in manifest.disks}
    if kept.disk not in disks and kept.disk != len(manifest.disks):
        return None
    if kept.offset > disks.get(kept.disk, 0):
        return None
    return kept
