"""A planned failover, on the primary: ``failover start --prepare`` ships every last change with
the VM off and keeps it from starting here; ``failover stop`` there cancels it."""

from __future__ import annotations

from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.primary import Primary
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import InvalidState


class PlannedFailover:
    def __init__(self, ctx: Context, vms: VmService, primary: Primary) -> None:
        self._ctx = ctx
        self._vms = vms
        self._primary = primary
        self._store = ctx.stores.replications
        vms.runtime.start_guards.append(self.start_guard)

    async def prepare(self, rec: VmRecord, row: ReplicationRow) -> ReplicationRow:
        if row.mode != "Primary":
            raise InvalidState(
                f"--prepare runs on the primary server of {rec.name}; this host holds its replica"
            )
        if rec.state != "Off":
            raise InvalidState(
                f"VM {rec.name} is running: a planned failover needs it off first (`vm stop {rec.name}`)"
            )
        allows(row, Command.PREPARE_FAILOVER)
        await self._primary.cycles.sync(rec.name)
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, self._store.get(row.vm_id, rec.name), Command.PREPARE_FAILOVER)
            self._ctx.events.record(
                "failover-prepared",
                f"planned failover of {rec.name} prepared: every change is on "
                f"{row.replica_server}; fail over there now",
                rec.name,
                tx=tx,
            )
        return self._store.get(row.vm_id, rec.name)

    async def cancel(self, row: ReplicationRow) -> None:
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.CANCEL_PREPARED)
            self._ctx.events.record(
                "failover-stopped", f"planned failover of {row.vm_name} cancelled", row.vm_name,
                tx=tx,
            )  # fmt: skip
        self._primary.scheduler.run(row.vm_id)

    def start_guard(self, vm: VmRecord) -> None:
        row = self._store.find(vm.id)
        if row is not None and row.mode == "Primary" and row.state == State.PREPARED_FOR_FAILOVER:
            raise InvalidState(
                f"VM {vm.name} is prepared for a planned failover and cannot start here: fail it "
                f"over on {row.replica_server}, or cancel with `failover stop {vm.name}`"
            )
