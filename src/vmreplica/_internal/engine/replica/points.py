"""Recovery points of a replica VM: frozen from ``tip`` at each recovery-point interval, the
oldest folded into ``base`` beyond the history to keep, listed for ``recovery-point list``.

Freezing and pruning are journaled (kinds ``freeze`` and ``prune``), and each is finished by the
same code whether it runs now or after a crash: :meth:`RecoveryPoints.finish_freeze` and
:meth:`RecoveryPoints.finish_prune` are idempotent.

Whether an apply opens a point is :func:`point_due`'s decision alone (pure, no clock): the
initial copy is never a point, however long the replica takes between applying it and asking.
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

STANDARD, APPLICATION_CONSISTENT = "Standard", "ApplicationConsistent"


def point_due(
    *, history: int, last_rp_time: str | None, state: str, initial: bool,
    application_consistent: bool, interval: int, now: datetime,
) -> str | None:  # fmt: skip
    """The kind of recovery point to freeze after an apply, or None for none.

    None: no history is kept; points have not started (``last_rp_time`` None, before the
    initial copy); the apply was the initial copy itself (``initial``: it started the points'
    clock, it is not one of them); the replica is resynchronizing (the end of it adds one) or
    still waits for its initial copy. Else an application-consistent delta always makes one of
    its kind, and any other makes a standard one once ``interval`` seconds have passed since
    ``last_rp_time``."""
    if history <= 0 or last_rp_time is None or initial:
        return None
    if state in (State.RESYNCHRONIZING, State.WAITING_FOR_INITIAL):
        return None
    if application_consistent:
        return APPLICATION_CONSISTENT
    age = (now - datetime.fromisoformat(last_rp_time)).total_seconds()
    return STANDARD if age >= interval else None


class RecoveryPoints:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def maybe_create(
        self, vm_id: str, application_consistent: bool = False, initial: bool = False
    ) -> None:
        """After an apply: a point if :func:`point_due` says one is due (``initial`` when that
        apply was the initial copy, which is not a point, however slow the replica is), then
        the oldest beyond the history folded into the base, a point made or not."""
        await faults.ahit("replica.before_point")
        row = replica_row(self._ctx, vm_id)
        kind = point_due(
            history=row.settings.recovery_history, last_rp_time=row.last_rp_time,
            state=row.state, initial=initial, application_consistent=application_consistent,
            interval=row.settings.recovery_point_interval, now=datetime.now(UTC),
        )  # fmt: skip
        if kind is not None:
            await self.freeze(row, kind)
        elif row.state in (State.RESYNCHRONIZING, State.WAITING_FOR_INITIAL):
            return  # the end of a resynchronization prunes
        # Also without a new point: a history lowered since (to 0 too, which makes none) is
        # kept from the next delta on.
        await self.prune(vm_id)

    async def freeze(self, row: ReplicationRow, kind: str) -> int:
        # Numbered from the row as it is now, under the replica lock: a caller's row read
        # before the lock (a failover's, across its wait for the primary's answer) may name a
        # point frozen meanwhile, which would then be "frozen" again as it is, without the
        # deltas applied since.
        row = replica_row(self._ctx, row.vm_id)
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
        """Finish folding ``point`` into the base; or, if a failover or test failover stands on
        a point now (one started while this merge was left unfinished, as a quarantined replica
        allows), give it up: every prefix of a merge reads as before (chain.py), the point stays
        listed, and a later prune folds it once nothing stands on it."""
        pinned = replica_row(self._ctx, row.vm_id).pinned
        for chain in chains(self._ctx, row):
            await chain.recover(pinned)
            ids = chain.point_ids()
            if ids and ids[0] == point:
                await chain.prune_oldest(pinned)
        if pinned and any(point in chain.point_ids() for chain in chains(self._ctx, row)):
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end(tx, "prune", row.vm_id)
            return
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
