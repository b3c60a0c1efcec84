"""The replica's side of a resynchronization.

The primary starts it (``resync-start``): each chain gets an overlay above ``tip``, and the
deltas of the resynchronization are applied into those overlays, so that ``tip``, every recovery
point and any failover stay exactly as they were until it ends. The primary compares blocks
(``resync-hashes``: hashes of the replica's current view, overlays included, every delta
already answered applied first), sends only the blocks that differ as ordinary deltas, then
finishes it (``resync-finish``: the overlays are committed into ``tip``, journaled as
``resync-commit``, and a recovery point is added) or cancels it (``resync-cancel``: the overlays
are dropped).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica.common import (
    chains,
    check_not_quarantined,
    check_sender,
    redirect_if_elsewhere,
    replica_row,
    staging_dir,
)
from vmreplica._internal.engine.replica.points import RecoveryPoints
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import (
    COMPARED,
    COMPRESSED,
    KEPT,
    OFFLINE,
    SEED,
    ReplicationRow,
)
from vmreplica._internal.transport import answers
from vmreplica._internal.transport import protocol as p
from vmreplica.errors import InvalidArgument, InvalidState

log = logging.getLogger("vmreplica.replica")


class ReplicaResync:
    def __init__(self, ctx: Context, points: RecoveryPoints) -> None:
        self._ctx = ctx
        self._points = points
        # ReplicaRecovery.replay_or_quarantine (it is built after this, and uses it)
        self.finish_steps: Callable[[str, str], Awaitable[bool]] | None = None

    async def start(
        self, authz: Authorization, peer_names: list[str], req: p.ResyncStartRequest
    ) -> answers.SequenceAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            row = replica_row(self._ctx, row.vm_id)
            check_not_quarantined(self._ctx, row)
            waiting = row.state == State.WAITING_FOR_INITIAL
            if waiting and req.from_empty:
                # start-initial --compressed: the primary sends every block that is not zero,
                # into the empty chain made at enable; a copy to compare against would be
                # left with blocks the primary has as zeros.
                if row.initial_kind == SEED:
                    raise InvalidState(
                        f"replica VM {row.vm_name} on {self._ctx.host} holds a copy to start "
                        "from: start initial replication with --use-backup, not --compressed"
                    )
                if row.initial_kind == KEPT or await _bases_hold_data(self._ctx, row):
                    # The kind says so; the bases' check also covers a kind that another
                    # start (offline media announced since) replaced.
                    raise InvalidState(
                        f"replica VM {row.vm_name} on {self._ctx.host} holds part of an earlier "
                        "initial copy: start initial replication without --compressed, which "
                        "resumes from it"
                    )
                if row.initial_kind == OFFLINE:  # media written earlier is superseded
                    shutil.rmtree(Path(str(row.storage_dir)) / "queued", ignore_errors=True)
                self._ctx.stores.replications.update(
                    row.vm_id, initial_kind=COMPRESSED, initial_media=None, sequence=0
                )
                row = replica_row(self._ctx, row.vm_id)
            if row.state == State.WAITING_FOR_INITIAL and row.initial_kind not in COMPARED:
                raise InvalidState(
                    f"replica VM {row.vm_name} on {self._ctx.host} holds no copy to start from: "
                    f"register one there with `vmreplica replication enable {row.vm_name} "
                    "--as-replica` before enabling replication, or start initial replication "
                    "without --use-backup"
                )
            if row.state != State.RESYNCHRONIZING:  # else a continued one: nothing to move
                with self._ctx.stores.db.tx() as tx:
                    move(self._ctx, tx, row, Command.START_RESYNC)
                    self._ctx.events.record(
                        "resync-started",
                        f"resynchronization of {row.vm_name} started by {peer_names[0]}: the "
                        "replica and its recovery points stay as they are until it finishes",
                        row.vm_name,
                        tx=tx,
                    )
            await ensure_overlays(self._ctx, replica_row(self._ctx, row.vm_id))
            return answers.SequenceAnswer(row.sequence)

    async def hashes(
        self, authz: Authorization, peer_names: list[str], req: p.HashesRequest
    ) -> answers.HashesAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        allows_hashing = (State.RESYNCHRONIZING,)
        if row.state not in allows_hashing:
            raise InvalidArgument(
                f"replica VM {row.vm_name} is not being resynchronized (state {row.state})"
            )
        if req.disk >= len(row.disks):
            raise InvalidArgument(f"replica VM {row.vm_name} has no disk {req.disk}")
        chain = chains(self._ctx, row)[req.disk]
        async with self._ctx.locks.replica(row.vm_id):  # after a delta applying behind its answer
            # and with every delta answered in: one whose apply behind its answer failed would
            # change the blocks hashed here after the primary compared them (a block it holds as
            # the replica did before that delta would read equal, and never be sent again).
            current = replica_row(self._ctx, row.vm_id)
            check_not_quarantined(self._ctx, current)  # its view may be a step short
            await self._finish_applies(current, "hashes asked for")
            found = await self._ctx.driver.hash_image(
                chain.top, req.block_size, req.first_block, req.count
            )
        return answers.HashesAnswer(tuple(found))

    async def _finish_applies(self, row: ReplicationRow, cause: str) -> None:
        """Under the replica lock: a delta answered but journaled and not applied (its apply
        behind the answer failed while the agent lived on) is applied now; refused if that
        fails (the replica is quarantined then)."""
        if not self._ctx.journal.entries("apply", subject=row.vm_id):
            return
        if self.finish_steps is None or not await self.finish_steps(row.vm_id, cause):
            raise InvalidState(
                f"replica VM {row.vm_name} on {self._ctx.host} holds a delta that cannot "
                "be applied: the resynchronization cannot go on"
            )

    async def finish(
        self, authz: Authorization, peer_names: list[str], req: p.VmRequest
    ) -> answers.SequenceAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            row = replica_row(self._ctx, row.vm_id)
            if row.state == State.REPLICATING and not _has_overlays(self._ctx, row):
                return answers.SequenceAnswer(row.sequence)  # a retried finish: it is done
            allows(row, Command.FINISH_RESYNC)
            if self._ctx.journal.entries("apply", subject=row.vm_id):
                # A delta applied behind its answer failed while the agent lived on: finish it
                # from the journal now, as the next delta would have.
                await self._finish_applies(row, "a delta applied behind its answer")
                row = replica_row(self._ctx, row.vm_id)
            # A compared initial copy (seed, kept cut copy, compressed) is not a point either.
            initial = row.initial_kind in COMPARED
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.begin(tx, "resync-commit", row.vm_id, {})
            await self.commit(row)
            row = replica_row(self._ctx, row.vm_id)
            if row.settings.recovery_history > 0 and not initial:
                await self._points.freeze(row, "Standard")  # the resync adds a point
                await self._points.prune(row.vm_id)
            return answers.SequenceAnswer(row.sequence)

    async def commit(self, row: ReplicationRow) -> None:
        """Fold every overlay into its ``tip``, then record the end; repeatable."""
        for chain in chains(self._ctx, row):
            await chain.end_resync(commit=True)
        with self._ctx.stores.db.tx() as tx:
            current = replica_row(self._ctx, row.vm_id)
            if current.state == State.RESYNCHRONIZING:
                seeded = current.initial_kind in COMPARED  # its first point: points start
                move(self._ctx, tx, current, Command.FINISH_RESYNC, initial_kind=None,
                     last_rp_time=now_iso() if seeded else current.last_rp_time)  # fmt: skip
            self._ctx.journal.end(tx, "resync-commit", row.vm_id)
            self._ctx.events.record(
                "resync-finished",
                f"resynchronization of {row.vm_name} finished: the replica equals the primary's "
                "view, and every earlier recovery point is kept",
                row.vm_name,
                tx=tx,
            )

    async def recover_commit(self, entry: JournalEntry) -> None:
        row = self._ctx.stores.replications.find(entry.subject)
        if row is None:
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry.id)
            return
        await self.commit(row)

    async def cancel(
        self, authz: Authorization, peer_names: list[str], req: p.VmRequest
    ) -> answers.SequenceAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            await self.drop(replica_row(self._ctx, row.vm_id), f"stopped by {peer_names[0]}")
            return answers.SequenceAnswer(replica_row(self._ctx, row.vm_id).sequence)

    async def drop(self, row: ReplicationRow, why: str) -> None:
        """End a resynchronization without its changes: the replica is exactly as before.

        The state moves first; overlays left by a crash right after are dropped by recovery,
        which drops them whenever the state is not Resynchronizing. A delta acknowledged but
        still journaled (its apply behind the answer failed, receive.py) was for the overlays:
        its entry ends with the state's move, or it would be counted as received and applied
        later, into ``tip`` or into another resynchronization's overlays."""
        if row.state == State.RESYNCHRONIZING:
            seeding = row.initial_kind in COMPARED
            applies = self._ctx.journal.entries("apply", subject=row.vm_id)
            with self._ctx.stores.db.tx() as tx:
                if seeding:  # the deltas went into the overlays dropped below: back to none
                    move(self._ctx, tx, row, Command.CANCEL_SEEDING, sequence=0)
                else:
                    move(self._ctx, tx, row, Command.CANCEL_RESYNC)
                for entry in applies:
                    self._ctx.journal.end_entry(tx, entry.id)
                self._ctx.events.record(
                    "resync-stopped",
                    f"resynchronization of {row.vm_name} {why}; the replica is as it was",
                    row.vm_name,
                    tx=tx,
                )
            for entry in applies:  # before the overlays: a half apply finds its delta gone
                shutil.rmtree(staging_dir(row, int(entry.data["sequence"])), ignore_errors=True)
        for chain in chains(self._ctx, row):
            await chain.end_resync(commit=False)


async def _bases_hold_data(ctx: Context, row: ReplicationRow) -> bool:
    return any([await ctx.driver.allocated(chain.base) for chain in chains(ctx, row)])


def _has_overlays(ctx: Context, row: ReplicationRow) -> bool:
    return any(chain.resync.exists() for chain in chains(ctx, row))


async def ensure_overlays(ctx: Context, row: ReplicationRow) -> None:
    """The overlays agree with the state: present while Resynchronizing, gone otherwise (what a
    crash between a state change and the overlays' may have left)."""
    for chain in chains(ctx, row):
        if row.state == State.RESYNCHRONIZING:
            await chain.begin_resync()
        else:
            await chain.end_resync(commit=False)
