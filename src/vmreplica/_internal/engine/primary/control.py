"""The operator's controls of a primary relationship (suspend, resume, reset statistics, remove),
and what happens when the VM's process dies under it."""

from __future__ import annotations

from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.resync import Resync
from vmreplica._internal.engine.primary.scheduler import Scheduler
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.ports.hypervisor import DiskOwner
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import ResyncRequired


class PrimaryControl:
    def __init__(
        self, ctx: Context, vms: VmService, pending: PendingLog, scheduler: Scheduler,
        resync: Resync,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._pending = pending
        self._scheduler = scheduler
        self._resync = resync
        self._store = ctx.stores.replications

    async def suspend(self, name: str) -> ReplicationRow:
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.state == State.RESYNCHRONIZING:
            await self._resync.suspend(row)
            return self._store.get(rec.id, name)
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.SUSPEND)
            self._ctx.events.record(
                "replication-suspended", f"replication of {name} suspended", name, tx=tx
            )
        return self._store.get(rec.id, name)

    async def resume(self, name: str) -> ReplicationRow:
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.state == State.WAITING_FOR_RESYNC:
            raise ResyncRequired(
                f"replication of {name} needs a resynchronization, which this version cannot run yet"
            )
        if row.state in (State.SUSPENDED, State.ERROR) and not (
            row.sequence and row.acked_sequence
        ):
            command = Command.RESUME_BEFORE_INITIAL  # the initial copy never got there
        else:
            command = Command.RESUME
        allows(row, command)
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, command, last_error=None, send_failure=None)
            self._ctx.events.record(
                "replication-resumed", f"replication of {name} resumed", name, tx=tx
            )
        self._scheduler.run(rec.id)
        return self._store.get(rec.id, name)

    async def reset_statistics(self, vm_id: str) -> None:
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.cycles.clear(tx, vm_id)
            self._store.update(vm_id, tx, stats_since=now_iso())

    async def remove(self, row: ReplicationRow) -> None:
        await self._scheduler.stop_vm(row.vm_id)
        rec = self._vms.find(row.vm_name)
        owner = DiskOwner(
            rec.name, rec.disks, row.disks, self._vms.run_dir(rec.id),
            self._vms.runtime.process(rec.id), vm_id=rec.id, formats=rec.formats,
        )  # fmt: skip
        async with self._ctx.locks.vm(rec.id), self._ctx.driver.session(owner) as session:
            await session.stop_tracking()
        self._pending.forget(row.vm_id)
        with self._ctx.stores.db.tx() as tx:
            self._store.delete(tx, row.vm_id)
            self._ctx.events.record(
                "replication-removed",
                f"replication of {row.vm_name} removed; change tracking dropped",
                row.vm_name,
                tx=tx,
            )

    def on_vm_off(self, rec: VmRecord, clean: bool) -> None:
        """A process that died without closing its images leaves every generation untrusted."""
        row = self._store.find(rec.id)
        if row is None or row.mode != "Primary" or clean:
            return
        if row.state not in (
            State.REPLICATING, State.SUSPENDED, State.INITIAL_IN_PROGRESS,
            State.RESYNCHRONIZING, State.RESYNC_SUSPENDED,
        ):  # fmt: skip
            return
        with self._ctx.stores.db.tx() as tx:
            move(
                self._ctx, tx, row, Command.LOSE_TRACKING,
                last_error="the VM's process died, so change tracking is lost",
            )  # fmt: skip
            self._ctx.events.record(
                "resync-required",
                f"change tracking of {rec.name} was lost (its process died): a "
                "resynchronization is required",
                rec.name,
                "error",
                tx=tx,
            )
