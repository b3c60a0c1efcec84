"""Reversing replication, on the host the VM failed over to: it becomes the primary, the old
primary its replica, and only what differs between the two travels (a delta failback).

Delta 1 of the reversed relationship carries what the VM wrote since the failover point (the top
of its overlays) and every range the old primary may hold differently: its unshipped writes and
the deltas the chain received above the failover point, all read from this host's disks. The
intent is journaled (kind ``reverse``) until delta 1 is cut, and a restart finishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmreplica._internal import extents as ext
from vmreplica._internal import faults
from vmreplica._internal.engine.connect import peer_address
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.failover.common import FAILBACK_FILE, FailoverBase
from vmreplica._internal.engine.primary import Primary
from vmreplica._internal.engine.replica import Replica
from vmreplica._internal.engine.states import Command
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.extents import Extent
from vmreplica._internal.ports.hypervisor import DiskOwner
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import answers
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import open_peer
from vmreplica.errors import (
    IntegrityError,
    InvalidArgument,
    InvalidState,
    ResyncRequired,
    VmrError,
)

log = logging.getLogger("vmreplica.failover")


class Reverse(FailoverBase):
    def __init__(self, ctx: Context, vms: VmService, replica: Replica, primary: Primary) -> None:
        super().__init__(ctx, vms, replica)
        self._primary = primary
        ctx.journal.register("reverse", self._finish)
        primary.cycles.unfinished.append(self._finish_open)

    async def reverse(
        self, name: str, replica_server: str | None, replica_port: int | None
    ) -> ReplicationRow:
        """The VM must be off: the extra ranges are read after the instant tracking starts,
        which is one consistent instant only while nothing writes. It stays locked off until
        delta 1 is cut."""
        rec, row = self._row(name)
        allows(row, Command.REVERSE)
        if self._ctx.cluster is not None:  # only the owner (docs/CLUSTER.md)
            self._ctx.cluster.check(row.vm_id, "reverse replication")
        server = replica_server or row.primary_server
        port = replica_port if replica_port is not None else row.peer_port  # 0 is refused
        if port is None:
            raise InvalidArgument(
                f"give --replica-port: the certificate port of {server} is not known here"
            )
        peer = peer_address(
            self._ctx.config, server, port, row.authentication_type, row.settings.encrypt
        )
        async with self._ctx.locks.vm(rec.id):
            rec, row = self._row(name)
            allows(row, Command.REVERSE)
            if rec.state != "Off":
                raise InvalidState(
                    f"VM {name} is running on {self._ctx.host}: stop it (`vm stop {name}`), then "
                    "reverse replication; the failback reads the disks at one instant, with "
                    "nothing writing to them, and the VM can start again right after"
                )
            here = await self._changes_above_point(row)
            request = p.ReverseRequest(
                vm_id=row.vm_id, vm_name=name, new_primary_port=self._ctx.own_port(row.authentication_type),
                failback_extents=True,  # this host takes the ranges of a delta failback
            )  # fmt: skip
            async with open_peer(peer, self._ctx.config.credentials) as old_primary:
                answer = await old_primary.reverse(request)
            extents, reason = _failback_extents(answer, here, len(row.disks))
            command = Command.REVERSE if reason is None else Command.REVERSE_WITHOUT_TRACKING
            with self._ctx.stores.db.tx() as tx:
                if reason is None:
                    data = {"extents": ext.to_json(extents)}
                    self._ctx.journal.begin(tx, "reverse", row.vm_id, data)
                self._ctx.stores.points.keep_only(tx, row.vm_id, None)
                move(
                    self._ctx, tx, row, command, mode="Primary", primary_server=self._ctx.host,
                    replica_server=peer.fqdn, replica_port=peer.port, sequence=0,
                    acked_sequence=0, generation=0, failover_point=None, peer_port=None,
                    trust_group=None, auth_entry=None, last_error=reason, quarantine=None,
                )  # fmt: skip
                self._ctx.events.record(
                    "replication-reversed",
                    f"{name} now replicates from {self._ctx.host} to {peer.fqdn}",
                    name,
                    tx=tx,
                )
            if row.storage_dir:  # what it said is in the journal now
                (Path(row.storage_dir) / FAILBACK_FILE).unlink(missing_ok=True)
            self._share(row)
            if reason is not None:
                # Its schedule runs a resynchronization in its automatic window, or at a time
                # given later, and its cycles after that, with no agent restart.
                self._primary.scheduler.run(row.vm_id)
                raise ResyncRequired(
                    f"replication of {name} is reversed, but {peer.fqdn} cannot be brought up to "
                    f"date by a delta ({reason}): a resynchronization is required"
                )
            await faults.ahit("reverse.after_local")  # sleep: a window for tests
            try:
                await self._failback_delta(row.vm_id, name, extents)
            except ResyncRequired:
                raise
            except VmrError as e:
                # Still journaled: the VM's cycles cut it first (_finish_open), starting now.
                self._primary.scheduler.run(row.vm_id)
                raise e.public_class()(
                    f"replication of {name} is reversed, but its failback delta could not be cut "
                    f"({e.message}); the next cycle cuts it (`replication sync {name}`)"
                ) from e
        await self._primary.cycles.send_pending(name)
        return self._store.get(row.vm_id, name)

    async def _failback_delta(
        self, vm_id: str, name: str, extents: Mapping[int, Sequence[Extent]]
    ) -> None:
        """Delta 1, cut with the VM's lock held: the top of the overlays plus ``extents``,
        copied from this host's disks as they read now.

        Should the VM run anyway (started between an interrupted reverse and its recovery), the
        delta cannot be exact and the relationship waits for a resynchronization instead.
        """
        row = self._store.get(vm_id, name)
        rec = self._vms.find(name)
        extra = {n: list(e) for n, e in extents.items() if e}
        process = self._vms.runtime.process(rec.id)
        if extra and process is not None:
            reason = (
                f"VM {name} was started before the failback delta was cut, so the ranges "
                f"{row.replica_server} changed after the failover point cannot be read at one instant"
            )
            with self._ctx.stores.db.tx() as tx:
                move(self._ctx, tx, row, Command.LOSE_TRACKING, last_error=reason)
                self._ctx.journal.end(tx, "reverse", vm_id)
                self._ctx.events.record(
                    "resync-required", f"{reason}: a resynchronization is required", name,
                    "error", tx=tx,
                )  # fmt: skip
            raise ResyncRequired(f"{reason}: a resynchronization is required")
        pending = self._primary.pending
        pending.clear(vm_id)
        pending.delta_dir(vm_id, 1).mkdir(parents=True)
        dests = pending.files(vm_id, 1, len(row.disks))
        owner = DiskOwner(
            rec.name,
            rec.disks,
            row.disks,
            self._vms.run_dir(rec.id),
            process,
            vm_id=rec.id,
            formats=rec.formats,
        )
        async with self._ctx.driver.session(owner) as session:
            await session.cut_top(dests)
            if extra:
                copied = await session.copy_ranges(dests, extra)
                log.info("failback delta of %s: %d bytes the old primary changed", name, copied)
        compression = "zstd" if row.settings.compression else "none"
        await wire.build_manifest(
            pending.delta_dir(vm_id, 1), vm_id, 1, "CrashConsistent", compression
        )
        with self._ctx.stores.db.tx() as tx:
            self._store.update(vm_id, tx, sequence=1, generation=1)
            self._ctx.journal.end(tx, "reverse", vm_id)
        self._primary.scheduler.run(vm_id)

    async def _finish_open(self, vm_id: str) -> None:
        """Before a cycle: a failback delta that could not be cut while the agent lived on."""
        for entry in self._ctx.journal.entries("reverse", subject=vm_id):
            await self._finish(entry)

    async def _finish(self, entry: JournalEntry) -> None:
        """A reverse whose failback delta was not cut: cut it now."""
        row = self._store.find(entry.subject)
        if row is None or row.mode != "Primary":
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry.id)
            return
        extents = ext.from_json(entry.data.get("extents", {}), len(row.disks))
        rec = self._vms.find(row.vm_name)
        try:
            async with self._ctx.locks.vm(rec.id):
                if not self._ctx.journal.pending(entry.id):
                    return  # the reverse itself cut it while this waited for the lock
                await self._failback_delta(row.vm_id, row.vm_name, extents)
        except ResyncRequired:
            return  # recorded, and the state says so
        self._ctx.events.record(
            "recovered", f"finished an interrupted reverse of {row.vm_name}", row.vm_name
        )


def _failback_extents(
    answer: answers.ReverseAnswer, here: Mapping[int, Sequence[Extent]] | None, disks: int
) -> tuple[dict[int, list[Extent]], str | None]:
    """What delta 1 must carry beyond the overlays' top, or why no delta can be exact.

    The union of what the old primary says it holds unshipped and what the replica chain
    received after the failover point; both are read from this host's disks.
    """
    if not answer.tracking_intact:
        return {}, answer.reason or "its change tracking was lost"
    if here is None:
        return {}, (
            "the failover was completed, and the recovery points after its point were deleted "
            "without recording what they changed"
        )
    try:
        there = ext.from_json(answer.extents, disks)
    except IntegrityError as exc:
        return {}, f"its answer was unusable: {exc}"
    return ext.union(here, there, disks=disks), None
