"""Recovery of a replica VM's journaled steps, by one routine for every occasion: at start-up,
right after a step failed in a running agent, and when an operator retries.

:meth:`ReplicaRecovery.replay` finishes every ``apply``, ``freeze`` and ``prune`` entry of one VM,
oldest first, and brings its chains to a clean state; the entries of a VM that is no replica
here any more (reversed since) just end. If that fails, the relationship is
quarantined: it refuses changes and shows Critical with the reason until ``replication resume``
on this host, or the next start, replays it successfully. One relationship never keeps the
agent, or any other, from working.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection
from pathlib import Path

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.common import REPLICA, chains, replica_row
from vmreplica._internal.engine.replica.kept import keep_cut_copy
from vmreplica._internal.engine.replica.points import RecoveryPoints
from vmreplica._internal.engine.replica.resync import ReplicaResync, ensure_overlays
from vmreplica._internal.engine.states import State
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.store.vms import VmRecord
from vmreplica.errors import InvalidState, VmrError

log = logging.getLogger("vmreplica.replica")

KINDS = ("apply", "freeze", "prune", "resync-commit")


class ReplicaRecovery:
    def __init__(
        self, ctx: Context, applier: Applier, points: RecoveryPoints, resync: ReplicaResync,
        imports: Collection[str],
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._applier = applier
        self._points = points
        self._resync = resync
        self._imports = imports  # VM ids with an initial copy open: their staging is in use
        for kind in KINDS:
            ctx.journal.register(kind, self._at_start)

    # -- the steps ---------------------------------------------------------------------------

    async def apply(
        self, row: ReplicationRow, sequence: int, staging: Path, started: str,
        size: int | None = None, consistency: str = "CrashConsistent",
    ) -> None:  # fmt: skip
        """Apply a journaled delta; should that fail, finish it right here as a restart would,
        and quarantine the relationship only if that fails too (the error then goes back)."""
        # The initial copy (applied in WaitingForInitialReplication) starts the points' clock.
        initial = replica_row(self._ctx, row.vm_id).state == State.WAITING_FOR_INITIAL
        try:
            await self._applier.finish(row, sequence, staging, started, size)
        except VmrError as e:
            log.warning(
                "applying delta %d of %s failed (%s): finishing it now", sequence, row.vm_name, e
            )
            await self.replay_or_quarantine(row.vm_id, f"applying delta {sequence} failed: {e}")
            if replica_row(self._ctx, row.vm_id).sequence < sequence:
                raise
        await self._point(row.vm_id, consistency == "ApplicationConsistent", initial)

    async def _point(
        self, vm_id: str, application_consistent: bool = False, initial: bool = False
    ) -> None:
        """After an apply: a point, if one is due. The delta is applied and acknowledged either
        way; a failed freeze or prune is finished right here, or quarantines the relationship."""
        try:
            await self._points.maybe_create(vm_id, application_consistent, initial)
        except VmrError as e:
            log.warning("recovery point of %s failed (%s): finishing it now", vm_id, e)
            await self.replay_or_quarantine(vm_id, f"creating a recovery point failed: {e}")

    # -- replay ------------------------------------------------------------------------------

    def has_steps(self, vm_id: str) -> bool:
        return bool(self._ctx.journal.entries(*KINDS, subject=vm_id))

    async def replay(self, vm_id: str) -> int:
        """Finish every journaled step of one replica VM, oldest first; returns how many."""
        finished = 0
        for entry in self._ctx.journal.entries(*KINDS, subject=vm_id):
            row = self._ctx.stores.replications.find(vm_id)
            # Gone, or the primary now (failed over and reversed while the step was left
            # unfinished): its chains back the VM's disks, and no replica step applies to them.
            if row is None or row.storage_dir is None or row.mode != REPLICA:
                with self._ctx.stores.db.tx() as tx:
                    self._ctx.journal.end_entry(tx, entry.id)
                continue
            for chain in chains(self._ctx, row):
                await chain.recover(row.pinned)
            log.info("finishing an interrupted %s of %s", entry.kind, row.vm_name)
            data = entry.data
            if entry.kind == "apply":
                size = data.get("size")
                await self._applier.finish(
                    row, int(data["sequence"]), Path(data["staging"]), str(data["started"]),
                    size if isinstance(size, int) else None,
                )  # fmt: skip
            elif entry.kind == "resync-commit":
                await self._resync.recover_commit(entry)
            elif entry.kind == "freeze":
                created = str(data.get("time") or entry.created)
                await self._points.finish_freeze(
                    row, int(data["point"]), str(data["kind"]), created
                )
            else:
                await self._points.finish_prune(row, int(data["point"]))
            finished += 1
        row = self._ctx.stores.replications.find(vm_id)
        if row is not None and row.mode == REPLICA and row.storage_dir is not None:
            for chain in chains(self._ctx, row):
                await chain.recover(row.pinned)
            await ensure_overlays(self._ctx, row)
            if vm_id not in self._imports:  # nothing staged is needed any more
                # but an initial copy this agent's death cut is kept for its retry
                await keep_cut_copy(self._ctx, row)
                shutil.rmtree(Path(row.storage_dir) / "staging", ignore_errors=True)
        return finished

    async def replay_or_quarantine(self, vm_id: str, cause: str) -> bool:
        """Replay; on failure mark the relationship quarantined (Critical, refusing changes)."""
        try:
            finished = await self.replay(vm_id)
        except Exception as e:  # one relationship must never stop the others, or the agent
            reason = e.message if isinstance(e, VmrError) else f"internal error: {e!r}"
            if not isinstance(e, VmrError):
                log.exception("recovery of replica %s failed", vm_id)
            self._quarantine(vm_id, f"{cause}, and finishing it failed: {reason}")
            return False
        row = self._ctx.stores.replications.find(vm_id)
        if finished and row is not None:
            self._ctx.events.record(
                "recovered",
                f"finished {finished} interrupted step(s) of {row.vm_name} ({cause})",
                row.vm_name,
            )
        return True

    def _quarantine(self, vm_id: str, reason: str) -> None:
        row = self._ctx.stores.replications.find(vm_id)
        if row is None:
            return
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.replications.update(vm_id, tx, quarantine=reason)
            self._ctx.events.record(
                "replica-quarantined",
                f"replica VM {row.vm_name} takes no changes until its recovery succeeds: {reason}",
                row.vm_name,
                "error",
                tx=tx,
            )

    def _lift(self, row: ReplicationRow) -> None:
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.replications.update(row.vm_id, tx, quarantine=None)
            self._ctx.events.record(
                "replica-recovered",
                f"replica VM {row.vm_name} recovered: it takes changes again",
                row.vm_name,
                tx=tx,
            )

    # -- occasions -------------------------------------------------------------------------

    async def _at_start(self, entry: JournalEntry) -> None:
        """The journal's handler for the three kinds: recover the whole VM the entry is about."""
        await self._recover_vm(entry.subject)

    async def _recover_vm(self, vm_id: str) -> None:
        row = self._ctx.stores.replications.find(vm_id)
        cluster = self._ctx.cluster
        if cluster is None or row is None or not row.storage_dir:
            recovered = await self.replay_or_quarantine(vm_id, "a restart")
        else:
            # Shared chains: another node may own the VM now and be staging or applying a
            # delta there (under this lock); its stage must not be swept away meanwhile.
            try:
                async with cluster.storage_held(Path(row.storage_dir)):
                    recovered = await self.replay_or_quarantine(vm_id, "a restart")
            except VmrError as e:  # the lock stayed held (another node writes), or no storage
                self._ctx.events.record(
                    "recovery-failed",
                    f"cannot recover replica VM {row.vm_name} at start-up (retried at the next "
                    f"start): {e.message}",
                    row.vm_name,
                    "warning",
                )
                return
        if recovered and row is not None and row.quarantine is not None:
            self._lift(row)

    async def recover(self) -> None:
        """At start-up: every replica VM with journaled steps, then every other one (its
        chains), each on its own; a quarantined one is retried, as its cause may be fixed."""
        await self._ctx.journal.recover(*KINDS)
        for row in self._ctx.stores.replications.all():
            if row.mode == REPLICA and row.storage_dir and not self.has_steps(row.vm_id):
                await self._recover_vm(row.vm_id)

    async def retry(self, vm: VmRecord) -> ReplicationRow:
        """``replication resume`` on the replica: retry the recovery of a quarantined replica."""
        row = replica_row(self._ctx, vm.id)
        if row.quarantine is None:
            raise InvalidState(
                f"replication of {vm.name} runs on its primary server {row.primary_server}: "
                "resume it there (this host holds its replica, which is not quarantined)"
            )
        async with self._ctx.locks.replica(vm.id):
            if not await self.replay_or_quarantine(vm.id, "an operator's resume"):
                reason = replica_row(self._ctx, vm.id).quarantine
                raise InvalidState(f"recovery of replica VM {vm.name} failed again: {reason}")
            self._lift(row)
        return replica_row(self._ctx, vm.id)
