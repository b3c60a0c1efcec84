"""Resynchronization on the primary: the way out of WaitingForStartResynchronize.

A new tracking generation and a point-in-time view of each disk start in one step. Both sides
hash fixed-size blocks of their own view at once (the replica its chain's current view), and
only the blocks whose hashes differ travel, as ordinary deltas through the normal sender and
the replica's journaled apply (into overlays there, so that stopping leaves the replica exactly
as before). The writes made since the view go in the next cycle. Progress is kept per disk after
every batch, so a suspended, failed or interrupted resynchronization continues from the last
block compared, with a new view but the same tracking generation, never from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from vmreplica._internal import faults
from vmreplica._internal.engine.connect import replica_address
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso, start_time_of
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.sender import Sender
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import CopySource, DiskOwner
from vmreplica._internal.store.replications import COMPARED, COMPRESSED, ReplicationRow
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import Peer, PeerAddress, open_peer
from vmreplica.errors import InvalidState, VmrError

log = logging.getLogger("vmreplica.primary")


BLOCK_SIZE = 64 << 10  # a qcow2 cluster: a block that differs costs no more than its writes
BATCH = 16384  # blocks compared between two saves of progress (1 GiB)


@dataclass
class _Tally:
    """What one run of the job did, for its last log line (the benchmark reads it)."""

    compared: int = 0
    differing: int = 0
    hashing: float = 0.0  # seconds both sides spent hashing, at once
    began: float = 0.0


def _how_done(row: ReplicationRow, tally: _Tally) -> str:
    """How an initial replication run as a resync ended, for its event. The counts are this
    run's only: a restarted agent that found its last delta made compares nothing."""
    if row.initial_kind != COMPRESSED:
        return (f"from the copy on the replica done: {tally.differing} of {tally.compared} "
                "blocks differed and were sent")  # fmt: skip
    if not tally.compared:
        return "as compressed deltas done"
    return (f"as compressed deltas done ({tally.differing} of the {tally.compared} blocks read "
            "by this run held data)")  # fmt: skip


def now() -> datetime:
    return datetime.now(UTC)


class Resync:
    def __init__(
        self, ctx: Context, vms: VmService, pending: PendingLog, sender: Sender,
        run: Callable[[str], None], stop: Callable[[str], Awaitable[None]],
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._pending = pending
        self._sender = sender
        self._run = run  # the scheduler's: start (or wake) the VM's task
        self._stop = stop  # the scheduler's: stop the VM's task (awaitable)
        self._store = ctx.stores.replications

    # -- the operator's commands -------------------------------------------------------------

    async def request(self, name: str, start_time: str | None) -> ReplicationRow:
        """``resume --resynchronize [--start-time]``: now, or at a time up to 7 days ahead."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        allows(row, Command.START_RESYNC)
        when = start_time_of(start_time) if start_time is not None else None
        if when is not None and when > datetime.now(UTC):
            self._store.update(row.vm_id, resync_at=when.isoformat(timespec="seconds"))
            self._ctx.events.record(
                "resync-scheduled", f"resynchronization of {name} scheduled for {when}", name
            )
        else:
            self.begin(row, "started by the operator")
        self._run(rec.id)
        return self._store.get(rec.id, name)

    def begin(self, row: ReplicationRow, why: str) -> None:
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.START_RESYNC, resync_at=None, resync_next=None,
                 resync_progress=0.0, last_error=None, send_failure=None)  # fmt: skip
            self._ctx.events.record(
                "resync-started", f"resynchronization of {row.vm_name} {why}", row.vm_name, tx=tx
            )

    async def resume(self, name: str) -> ReplicationRow:
        """``resume --continue``: a suspended resynchronization goes on where it stopped."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.state != State.RESYNC_SUSPENDED:
            raise InvalidState(
                f"there is no suspended resynchronization of {name} to continue (state {row.state})"
            )
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.RESUME, last_error=None, send_failure=None)
            self._ctx.events.record(
                "resync-continued", f"resynchronization of {name} continues", name, tx=tx
            )
        self._run(rec.id)
        return self._store.get(rec.id, name)

    async def suspend(self, row: ReplicationRow) -> None:
        await self._stop(row.vm_id)  # at once, not at the end of a batch
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, self._store.get(row.vm_id, row.vm_name), Command.SUSPEND)
            self._ctx.events.record(
                "resync-suspended",
                f"resynchronization of {row.vm_name} suspended at "
                f"{row.resync_progress or 0:.0f}%; `replication resume --continue` goes on",
                row.vm_name,
                tx=tx,
            )
        self._run(row.vm_id)

    async def cancel(self, name: str) -> ReplicationRow:
        """``replication stop``: the replica is left exactly as before the resynchronization."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        seeding = row.initial_kind in COMPARED
        allows(row, Command.STOP_INITIAL if seeding else Command.CANCEL_RESYNC)
        await self._stop(row.vm_id)
        with self._ctx.stores.db.tx() as tx:
            current = self._store.get(row.vm_id, name)
            if seeding:  # back to ReadyForInitialReplication; the replica keeps its copy
                move(self._ctx, tx, current, Command.STOP_INITIAL, resync_next=None,
                     resync_progress=None, initial_kind=None, initial_progress=None, sequence=0,
                     acked_sequence=0)  # fmt: skip
            else:
                move(self._ctx, tx, current, Command.CANCEL_RESYNC, resync_at=None,
                     resync_next=None, resync_progress=None)  # fmt: skip
            what = "initial replication" if seeding else "resynchronization"
            self._ctx.events.record(f"{'initial-replication' if seeding else 'resync'}-stopped",
                                    f"{what} of {name} stopped", name, tx=tx)  # fmt: skip
        self._pending.clear(row.vm_id)
        try:
            async with open_peer(self._peer(row), self._ctx.config.credentials) as replica:
                await replica.resync_cancel(p.VmRequest(row.vm_id))
        except VmrError as e:
            # Its overlays stay until the next resynchronization or stop reaches it; nothing
            # of this one was committed there.
            log.warning("telling %s that the resync of %s stopped failed: %s",
                        row.replica_server, name, e)  # fmt: skip
        self._run(row.vm_id)
        return self._store.get(rec.id, name)

    def due(self, row: ReplicationRow, now: datetime) -> bool:
        """Whether a resync waiting to start should start now: its time has come, or the VM
        resynchronizes automatically and ``now`` is inside its window."""
        if row.state != State.WAITING_FOR_RESYNC:
            return False
        if row.resync_at is not None:
            return datetime.fromisoformat(row.resync_at) <= now
        if not row.settings.auto_resynchronize:
            return False
        local = now.astimezone().strftime("%H:%M")
        start, end = row.settings.auto_resync_start, row.settings.auto_resync_end
        return start <= local < end if start <= end else (local >= start or local < end)

    def next_wake(self, row: ReplicationRow) -> datetime | None:
        return datetime.fromisoformat(row.resync_at) if row.resync_at else None

    # -- the job -----------------------------------------------------------------------------

    def _peer(self, row: ReplicationRow) -> PeerAddress:
        return replica_address(self._ctx.config, row)

    async def run(self, row: ReplicationRow) -> None:
        """Compare and send until every block of every disk was compared, then finish."""
        tally = _Tally(began=time.monotonic())
        async with open_peer(
            self._peer(row), self._ctx.config.credentials, timeout=120.0
        ) as replica:
            status = await replica.status(p.StatusRequest(row.vm_id))
            fresh = row.resync_next is None
            if fresh:
                # Whatever the log held is superseded; the sequences meet where the replica is.
                self._pending.clear(row.vm_id)
                start = {str(n): 0 for n in range(len(row.disks))}
                self._store.update(
                    row.vm_id, sequence=status.sequence, acked_sequence=status.sequence,
                    resync_next=json.dumps(start), resync_progress=0.0,
                )  # fmt: skip
                row = self._store.get(row.vm_id, row.vm_name)
            from_empty = row.initial_kind == COMPRESSED
            await replica.resync_start(p.ResyncStartRequest(row.vm_id, from_empty))
            rec = self._vms.find(row.vm_name)
            async with self._ctx.locks.vm(rec.id):
                owner = DiskOwner(
                    rec.name, rec.disks, row.disks, self._vms.run_dir(rec.id),
                    self._vms.runtime.process(rec.id), vm_id=rec.id, formats=rec.formats,
                )  # fmt: skip
                # A fresh one starts tracking anew at the view's instant; a continued one keeps
                # that generation, which holds every write since the first view.
                async with self._ctx.driver.point_in_time(owner, 1 if fresh else None) as view:
                    done = await self._compare_all(row, view, replica, tally)
            if not done:
                return  # suspended or stopped meanwhile
            if row.initial_kind != COMPRESSED:  # its pipelined sends saw every delta answered
                await self._sender.send(self._store.get(row.vm_id, row.vm_name), now())
            await replica.resync_finish(p.VmRequest(row.vm_id))
        log.info("resync of %s finished: %d blocks compared in %.2f s of hashing, %d differ; "
                 "%.2f s in all", row.vm_name, tally.compared, tally.hashing, tally.differing,
                 time.monotonic() - tally.began)  # fmt: skip
        with self._ctx.stores.db.tx() as tx:
            current = self._store.get(row.vm_id, row.vm_name)
            seeded = current.initial_kind in COMPARED
            move(self._ctx, tx, current, Command.FINISH_RESYNC, generation=1, resync_next=None,
                 resync_progress=100.0, last_replication_time=now_iso(), initial_kind=None,
                 initial_progress=100.0 if seeded else current.initial_progress)  # fmt: skip
            if seeded:
                self._ctx.events.record(
                    "initial-replication-done",
                    f"initial replication of {row.vm_name} {_how_done(current, tally)}",
                    row.vm_name,
                    tx=tx,
                )
            else:
                self._ctx.events.record(
                    "resync-finished",
                    f"resynchronization of {row.vm_name} finished: the replica equals the view it "
                    "started from, and the writes since then go in the next cycle",
                    row.vm_name,
                    tx=tx,
                )

    async def _compare_all(
        self, row: ReplicationRow, view: CopySource, replica: Peer, tally: _Tally
    ) -> bool:
        rec = self._vms.find(row.vm_name)
        sizes = [await self._ctx.driver.virtual_size(rec.disks[i], rec.format_of(i))
                 for i in row.disks]  # fmt: skip
        blocks = [-(-size // BLOCK_SIZE) for size in sizes]
        total = sum(blocks) or 1
        # A compressed initial copy is bound by the link: the next batch is read and written
        # out while the last ones travel (at most two deltas on disk not yet acknowledged), and
        # the sender keeps the link busy across deltas (pipelined); the first batch is the
        # smallest (4 MiB), as nothing travels while it is read, and the last ones shrink.
        overlap = row.initial_kind == COMPRESSED
        batch_blocks = BATCH // 256 if overlap else BATCH
        sending: asyncio.Future[None] | None = None
        try:
            while True:
                row = self._store.get(row.vm_id, row.vm_name)
                if row.state != State.RESYNCHRONIZING:
                    return False
                position = {int(k): v for k, v in json.loads(row.resync_next or "{}").items()}
                size = batch_blocks
                if overlap:  # the last ones smaller too: nothing travels while the last applies
                    left = sum(b - position.get(n, 0) for n, b in enumerate(blocks))
                    size = min(batch_blocks, max(BATCH // 64, left // 2))
                batch = {
                    n: (position.get(n, 0), min(size, blocks[n] - position.get(n, 0)))
                    for n in range(len(blocks))
                    if position.get(n, 0) < blocks[n]
                }
                if not batch:
                    if overlap:
                        await self._sent(row, sending, ahead=0)
                    return True
                await self._one_batch(row, view, replica, tally, batch, position, total)
                # Each batch read while the last travels: four times the last, up to 256 MiB.
                batch_blocks = min(BATCH // 4, batch_blocks * 4) if overlap else BATCH
                if overlap:
                    sending = await self._sent(row, sending, ahead=1)
                else:
                    await self._sender.send(self._store.get(row.vm_id, row.vm_name), now())
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending

    async def _sent(
        self, row: ReplicationRow, sending: asyncio.Future[None] | None, ahead: int
    ) -> asyncio.Future[None] | None:
        """Keep a pipelined send running until at most ``ahead`` committed deltas are not yet
        acknowledged; a send's failure ends the job here, as a send of its own would."""
        while True:
            if sending is not None and sending.done():
                await sending
                sending = None
            current = self._store.get(row.vm_id, row.vm_name)
            unacknowledged = current.sequence - current.acked_sequence
            if sending is None:  # none running, or it ended before the last commit
                if not unacknowledged:
                    return None
                sending = asyncio.ensure_future(self._sender.send(current, now(), pipelined=True))
            if unacknowledged <= ahead:
                return sending
            await asyncio.wait([sending], timeout=0.1)

    async def _one_batch(
        self, row: ReplicationRow, view: CopySource, replica: Peer, tally: _Tally,
        batch: dict[int, tuple[int, int]], position: dict[int, int], total: int,
    ) -> None:  # fmt: skip
        """Compare one batch and commit its differing blocks as the next pending delta."""
        hashing = time.monotonic()
        differing = await self._compare(row, view, replica, batch)
        tally.hashing += time.monotonic() - hashing
        tally.compared += sum(count for _, count in batch.values())
        after = {**position, **{n: first + count for n, (first, count) in batch.items()}}
        progress = round(100.0 * sum(after.values()) / total, 1)
        held = await self._commit_batch(row, view, differing, after, progress)
        tally.differing += sum(held.values())
        for n, (first, count) in batch.items():
            log.info("resync of %s: disk %d blocks %d-%d compared, %d differ", row.vm_name,
                     n, first, first + count - 1, held.get(n, 0))  # fmt: skip
        await faults.ahit("primary.mid_resync")

    async def _compare(
        self, row: ReplicationRow, view: CopySource, replica: Peer,
        batch: dict[int, tuple[int, int]],
    ) -> dict[int, list[int]]:  # fmt: skip
        """Per disk, the blocks of the batch whose hashes differ; both sides hash at once."""
        differing: dict[int, list[int]] = {}
        for n, (first, count) in batch.items():
            if row.initial_kind == COMPRESSED:
                # Into the replica's empty chain (resync-start checked it): each block that
                # is not zero here differs. Not read here: the extraction reads the view once
                # and leaves the zero blocks out (_commit_batch).
                differing[n] = list(range(first, first + count))
                continue
            request = p.HashesRequest(row.vm_id, n, BLOCK_SIZE, first, count)
            here, there = await asyncio.gather(
                self._ctx.driver.hash_view(view, n, BLOCK_SIZE, first, count),
                replica.resync_hashes(request),
            )
            if len(there.hashes) != len(here):
                raise InvalidState(
                    f"the replica hashed {len(there.hashes)} blocks of disk {n} of "
                    f"{row.vm_name}, this host {len(here)}: do the disks differ in size?"
                )
            pairs = enumerate(zip(here, there.hashes, strict=True))
            differing[n] = [first + i for i, (a, b) in pairs if a != b]
        return differing

    async def _commit_batch(
        self, row: ReplicationRow, view: CopySource, differing: dict[int, list[int]],
        after: dict[int, int], progress: float,
    ) -> dict[int, int]:  # fmt: skip
        """The differing blocks as the next delta of the pending log, and the progress, in one
        commit; nothing to send, progress alone. Returns, per disk, the blocks the delta holds
        (a compressed initial copy leaves out the blocks that read as zeros)."""
        from_empty = row.initial_kind == COMPRESSED
        held = {n: len(blocks) for n, blocks in differing.items()}
        position, sequence = json.dumps(after), row.sequence + 1
        delta_dir = self._pending.delta_dir(row.vm_id, sequence)
        shutil.rmtree(delta_dir, ignore_errors=True)
        try:
            if any(differing.values()):
                delta_dir.mkdir(parents=True)
            for n in range(len(row.disks) if any(differing.values()) else 0):
                blocks, disk = differing.get(n, []), wire.disk_file(delta_dir, n)
                data = await self._ctx.driver.extract_blocks(
                    view, n, disk, blocks, BLOCK_SIZE, skip_zeros=from_empty
                )
                if from_empty:
                    held[n] = -(-data // BLOCK_SIZE)  # only the disk's last block may be short
            if not any(held.values()):  # nothing differs (or only zeros): progress alone
                shutil.rmtree(delta_dir, ignore_errors=True)
                self._store.update(row.vm_id, resync_next=position, resync_progress=progress)
                return held
            # --compressed compresses whatever the setting says: that is what it asks for.
            kind = "zstd" if row.settings.compression or from_empty else "none"
            await wire.build_manifest(delta_dir, row.vm_id, sequence, "CrashConsistent", kind)
        except BaseException:
            shutil.rmtree(delta_dir, ignore_errors=True)
            raise
        with self._ctx.stores.db.tx() as tx:
            self._store.update(row.vm_id, tx, sequence=sequence, resync_next=position,
                               resync_progress=progress)  # fmt: skip
        log.info("resync of %s: %d differing blocks in delta %d (%.1f%%)", row.vm_name,
                 sum(held.values()), sequence, progress)  # fmt: skip
        return held
