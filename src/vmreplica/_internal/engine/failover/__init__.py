"""Failover: planned (:mod:`.planned`, on the primary), unplanned or after a prepare
(:mod:`.unplanned`, on the replica), test failover (:mod:`.test`), reversing the direction
(:mod:`.reverse`) and the old primary's side of it (:mod:`.old_primary`).

:class:`FailoverService` is what the management API calls: it sends each command to the
operation its side and state call for.
"""

from __future__ import annotations

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.failover.old_primary import OldPrimary
from vmreplica._internal.engine.failover.planned import PlannedFailover
from vmreplica._internal.engine.failover.reverse import Reverse
from vmreplica._internal.engine.failover.test import TestFailover
from vmreplica._internal.engine.failover.unplanned import Failover
from vmreplica._internal.engine.primary import Primary
from vmreplica._internal.engine.replica import Replica
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import InvalidState


class FailoverService:
    def __init__(self, ctx: Context, vms: VmService, primary: Primary, replica: Replica) -> None:
        self._ctx = ctx
        self._vms = vms
        self.planned = PlannedFailover(ctx, vms, primary)
        self.failover = Failover(ctx, vms, replica)
        self.failover.register()
        self.test = TestFailover(ctx, vms, replica)
        self.test.register()
        self.reverse = Reverse(ctx, vms, replica, primary)
        self.old_primary = OldPrimary(ctx, vms, primary)

    def _row(self, name: str) -> ReplicationRow:
        rec = self._vms.find(name)
        return self._ctx.stores.replications.get(rec.id, name)

    async def start(
        self, name: str, prepare: bool, as_test: bool, point: str | None, force: bool
    ) -> ReplicationRow:
        rec, row = self._vms.find(name), self._row(name)
        if prepare:
            return await self.planned.prepare(rec, row)
        if row.mode != "Replica":
            raise InvalidState(
                f"VM {name} is the primary here: fail over on its replica server {row.replica_server} "
                f"(on this host, `failover start {name} --prepare` prepares a planned failover)"
            )
        if row.state == State.WAITING_FOR_INITIAL:
            raise InvalidState(
                f"replica VM {name} has no data yet: initial replication is not finished"
            )
        if as_test:
            return await self.test.start(rec, row, point)
        return await self.failover.start(row, point, force)

    async def stop(self, name: str) -> ReplicationRow:
        row = self._row(name)
        if row.test_vm_id is not None:
            await self.test.stop(row)
        elif row.mode == "Replica" and row.state == State.FAILED_OVER_WAITING:
            await self.failover.stop(row)
        elif row.mode == "Primary" and row.state == State.PREPARED_FOR_FAILOVER:
            await self.planned.cancel(row)
        else:
            raise InvalidState(f"there is no failover of {name} to stop (state {row.state})")
        return self._row(name)

    async def complete(self, name: str) -> ReplicationRow:
        row = self._row(name)
        if row.mode != "Replica" or row.failover_point is None:
            raise InvalidState(f"there is no failover of {name} to complete (state {row.state})")
        return await self.failover.complete(row)


__all__ = ["FailoverService"]
