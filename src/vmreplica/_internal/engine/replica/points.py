"""Recovery points of a replica VM: frozen from ``tip`` at each recovery-point interval, the
oldest folded into ``base`` beyond the history to keep, listed for ``recovery-point list``.

Freezing and pruning are journaled (kinds ``freeze`` and ``prune``), and each is finished by the
same code whether it runs now or after a crash: :meth:`RecoveryPoints.finish_freeze` and
:meth:`RecoveryPoints.finish_prune` are idempotent.
"""

from __future__ import annotations

from datetime import UTC, datetime

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica.common import REPLICA, chains, replica_row
from vmreplica._internal.engine.states import State
from vmreplica._internal.models import RecoveryPoint
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.store.vms import VmRecord
from vmreplica.errors import InvalidState


class RecoveryPoints:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def maybe_create(self, vm_id: str, application_consistent: bool = False) -> None:
        """A point, if the interval since the last one has passed (and history is kept); after
        an application-consistent delta, always one, of that kind."""
        row = replica_row(self._ctx, vm_id)
        if row.settings.recovery_history == 0 or row.last_rp_time is None:
            return
        if row.state == State.RESYNCHRONIZING:
            return  # tip does not change until it ends, which adds a point
        if application_consistent:
            await self.freeze(row, "ApplicationConsistent")
            await self.prune(vm_id)
            return
        age = (datetime.now(UTC) - datetime.fromisoformat(row.last_rp_time)).total_seconds()
        if age < row.settings.recovery_point_interval:
            return
        await self.freeze(row, "Standard")
        await self.prune(vm_id)

    async def freeze(self, row: ReplicationRow, kind: str) -> int:
        point = row.next_rp_id
        # The point holds tip as it is now: its time is now, even if a restart finishes it.
        created = now_iso()
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(
                tx, "freeze", row.vm_id, {"point": point, "kind": kind, "time": created}
            )
        faults.hit("replica.mid_freeze")
        await self.finish_freeze(row, point, kind, created)
        return point

    async def finish_freeze(self, row: ReplicationRow, point: int, kind: str, created: str) -> None:
        for chain in chains(self._ctx, row):
            await chain.freeze_recovery_point(point)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.points.add(tx, row.vm_id, point, created, kind)
            self._ctx.stores.replications.update(
                row.vm_id, tx, next_rp_id=point + 1, last_rp_time=created
            )
            self._ctx.journal.end(tx, "freeze", row.vm_id)
            self._ctx.events.record(
                "recovery-point-created",
                f"recovery point {point} of {row.vm_name} created",
                row.vm_name,
                tx=tx,
            )

    async def prune(self, vm_id: str) -> None:
        """Fold the oldest points into the base until at most ``recovery_history`` remain;
        nothing while a failover or a test failover stands on a point."""
        row = replica_row(self._ctx, vm_id)
        while not row.pinned:
            ids = self._ctx.stores.points.ids(vm_id)
            if len(ids) <= row.settings.recovery_history:
                return
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.begin(tx, "prune", vm_id, {"point": ids[0]})
            await self.finish_prune(row, ids[0])

    async def finish_prune(self, row: ReplicationRow, point: int) -> None:
        for chain in chains(self._ctx, row):
            await chain.recover()
            ids = chain.point_ids()
            if ids and ids[0] == point:
                await chain.prune_oldest()
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.points.remove(tx, row.vm_id, point)
            self._ctx.journal.end(tx, "prune", row.vm_id)
            self._ctx.events.record(
                "recovery-point-merged",
                f"recovery point {point} of {row.vm_name} merged into the base",
                row.vm_name,
                tx=tx,
            )

    def list(self, vm: VmRecord) -> list[RecoveryPoint]:
        row = self._ctx.stores.replications.find(vm.id)
        if row is None or row.mode != REPLICA:
            raise InvalidState(f"VM {vm.name} is not a replica VM: it has no recovery points")
        found = chains(self._ctx, row)
        out: list[RecoveryPoint] = []
        for point in self._ctx.stores.points.all(vm.id):
            files = [c.rp_path(point.id) for c in found]
            size = sum(f.stat().st_size for f in files if f.exists())
            out.append(RecoveryPoint(str(point.id), vm.name, point.creation_time, point.kind, size))
        tip_size = sum(c.tip.stat().st_size for c in found if c.tip.exists())
        latest = row.last_replication_time or row.enabled_time
        out.append(RecoveryPoint("Latest", vm.name, latest, "Latest", tip_size))
        return out
