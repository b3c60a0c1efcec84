"""One replication cycle on the primary: cut a delta of everything written since the last one,
commit it to the pending log, send the log.

Change tracking rotates a generation per cycle (ports/hypervisor.py): the generation a delta was
cut from is dropped only after the delta is durably in the log and the database says so, so a
crash at any moment loses no write.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary.consistency import AppConsistency, Freeze
from vmreplica._internal.engine.primary.failures import record_failure
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.sender import Sender
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.ports.hypervisor import DiskOwner
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import delta as wire
from vmreplica.errors import InvalidState, ResyncRequired, VmrError

MOVE = "vm-move"  # the journal kind of `vm move` (engine/primary/move.py)


class MoveInProgress(InvalidState):
    """A cycle refused while the VM moves to another node."""


RESYNC_PENDING_FRACTION = 0.5


class Cycles:
    def __init__(
        self, ctx: Context, vms: VmService, pending: PendingLog, sender: Sender,
        consistency: AppConsistency,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._consistency = consistency
        self._vms = vms
        self._pending = pending
        self._sender = sender
        self._store = ctx.stores.replications
        self._sizes: dict[str, int] = {}
        # Run first by every cycle, before it takes the VM's lock: each finishes a step of its
        # own that failed while the agent lived on (a reverse's failback delta), which the
        # start-up recovery would otherwise finish only at the next start.
        self.unfinished: list[Callable[[str], Awaitable[None]]] = []

    def owner(self, rec: VmRecord, row: ReplicationRow) -> DiskOwner:
        return DiskOwner(
            rec.name, rec.disks, row.disks, self._vms.run_dir(rec.id),
            self._vms.runtime.process(rec.id), vm_id=rec.id, formats=rec.formats,
        )  # fmt: skip

    async def cycle(
        self, vm_id: str, started: datetime, missed: int = 0, *, moving: bool = False
    ) -> None:
        """Cut a delta of everything written since the last one, queue it, send the queue.

        While the VM moves (`vm move`), only the move's own last cycle runs: a delta cut after
        it would move the tracking generation on in the shared images behind the facts the
        target takes, and stay in this node's pending log, which the move forgets."""
        async with self._ctx.locks.cycle(vm_id):
            row = self._store.get(vm_id, vm_id)
            if not moving and self._ctx.journal.entries(MOVE, subject=vm_id):
                raise MoveInProgress(f"VM {row.vm_name} is busy: a move of it is in progress")
            for finish in self.unfinished:
                await finish(vm_id)
            row = self._store.get(vm_id, vm_id)
            rec = self._vms.find(row.vm_name)
            sequence = row.sequence + 1
            delta_dir = self._pending.delta_dir(row.vm_id, sequence)
            shutil.rmtree(delta_dir, ignore_errors=True)
            delta_dir.mkdir(parents=True)
            compression = "zstd" if row.settings.compression else "none"
            committed = False
            freeze: Freeze | None = None
            try:
                async with (
                    self._ctx.locks.vm(rec.id),
                    self._ctx.driver.session(self.owner(rec, row)) as session,
                ):
                    process = self._vms.runtime.process(rec.id)
                    if process is not None and self._consistency.due(row, datetime.now(UTC)):
                        freeze = await self._consistency.freeze(row, process)
                    await session.settle(row.generation)
                    files = self._pending.files(row.vm_id, sequence, len(row.disks))
                    await session.cut(row.generation, files)
                    consistent = freeze is not None and await self._consistency.thaw(freeze)
                    consistency = "ApplicationConsistent" if consistent else "CrashConsistent"
                    await wire.build_manifest(
                        delta_dir, row.vm_id, sequence, consistency, compression
                    )
                    await faults.ahit("primary.after_cut")  # sleep: a window for tests
                    # The commit point: the delta is durable in the log, the generation moves on.
                    self._store.update(row.vm_id, sequence=sequence, generation=row.generation + 1)
                    committed = True
                    faults.hit("primary.after_commit")
                    await session.drop(row.generation)
            except BaseException:
                if not committed:
                    shutil.rmtree(delta_dir, ignore_errors=True)
                raise
            finally:
                if freeze is not None:
                    await self._consistency.thaw(freeze)  # whatever happened: at once
            if freeze is not None:
                self._consistency.done(row, consistent, freeze)
        row = self._store.get(row.vm_id, row.vm_name)
        if self._pending.size(row.vm_id) > RESYNC_PENDING_FRACTION * await self._disk_size(rec):
            raise ResyncRequired(
                f"the pending log of {row.vm_name} exceeds half of its disk size: a "
                "resynchronization is required"
            )
        await self._sender.send(row, started, missed)

    async def _disk_size(self, rec: VmRecord) -> int:
        if rec.id not in self._sizes:
            self._sizes[rec.id] = sum(
                [
                    await self._ctx.driver.virtual_size(d, rec.format_of(i))
                    for i, d in enumerate(rec.disks)
                ]
            )
        return self._sizes[rec.id]

    async def sync(self, name: str) -> ReplicationRow:
        """Replicate now, outside the schedule, and return once the replica has it all."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.mode != "Primary" or row.state != State.REPLICATING:
            raise InvalidState(
                f"replication of {name} is not running here (state {row.state}, mode {row.mode})"
            )
        started = datetime.now(UTC)
        try:
            await self.cycle(rec.id, started)
        except MoveInProgress:
            raise  # not a failure of the replication: the move sends the last delta
        except VmrError as e:
            record_failure(self._ctx, self._store.get(rec.id, name), started, e, 0)
            raise
        return self._store.get(rec.id, name)

    async def send_pending(self, name: str) -> None:
        """Send what the pending log holds, now (after a reverse: the failback delta)."""
        rec = self._vms.find(name)
        started = datetime.now(UTC)
        try:
            await self._sender.send(self._store.get(rec.id, name), started)
        except VmrError as e:
            record_failure(self._ctx, self._store.get(rec.id, name), started, e, 0)
            raise
