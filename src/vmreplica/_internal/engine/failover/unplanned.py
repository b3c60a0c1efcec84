"""Failing over on the replica (planned after ``--prepare``, or unplanned to any recovery point),
cancelling it, and completing it. Each start is journaled (kind ``failover``) and rolled back if
a crash interrupts it before it is recorded; completing is journaled (kind ``failover-complete``)
and finished if a crash interrupts it."""

from __future__ import annotations

import shutil
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.connect import peer_address
from vmreplica._internal.engine.context import allows, move
from vmreplica._internal.engine.failover.common import FailoverBase
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.common import chains
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import UNREACHABLE, PeerConnectionFailed, open_peer
from vmreplica.errors import InvalidState, VmrError

COMPLETE = handoff.COMPLETE_KIND  # journal kind: the newer points and tip being deleted


class Failover(FailoverBase):
    def register(self) -> None:
        self._ctx.journal.register("failover", self._roll_back)
        self._ctx.journal.register(COMPLETE, self._finish_complete)

    async def start(self, row: ReplicationRow, point: str | None, force: bool) -> ReplicationRow:
        self._owner_only(row, "fail over this replica VM")
        if row.state != State.RESYNCHRONIZING:
            allows(row, Command.FAIL_OVER)
        primary_check = await self._split_brain_guard(row, force)
        await faults.ahit("failover.after_guard")  # sleep: a slow answer, for tests
        async with self._ctx.locks.replica(row.vm_id):
            if self._store.get(row.vm_id, row.vm_name).state == State.RESYNCHRONIZING:
                # Fail over to the replica as it was before the resynchronization began.
                await self._replica.resync.drop(row, "stopped by a failover")
                row = self._store.get(row.vm_id, row.vm_name)
                allows(row, Command.FAIL_OVER)
            chosen = await self._choose_point(row, point)
            row = await self._fail_over(row, chosen, primary_check)
            self._share(row)
            return row

    def _owner_only(self, row: ReplicationRow, what: str) -> None:
        """In a cluster only the owning node fails over (and so runs the VM): another node's
        facts may be older than the shared storage's (docs/CLUSTER.md)."""
        if self._ctx.cluster is not None:
            self._ctx.cluster.check(row.vm_id, what)

    async def _fail_over(
        self, row: ReplicationRow, point: int, primary_check: str
    ) -> ReplicationRow:
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(tx, "failover", row.vm_id, {"point": point})
        overlays = await self._overlays(row, point, "failover")
        faults.hit("failover.after_overlays")
        name = row.vm_name
        with self._ctx.stores.db.tx() as tx:
            self._vms.set_disks(tx, row.vm_id, overlays)
            move(self._ctx, tx, self._store.get(row.vm_id, name), Command.FAIL_OVER,
                 failover_point=point)  # fmt: skip
            self._ctx.journal.end(tx, "failover", row.vm_id)
            self._ctx.events.record(
                "failover-started",
                f"{name} failed over to recovery point {point} ({primary_check}); start it "
                f"with `vm start {name}`, then complete, stop or reverse the failover",
                name,
                tx=tx,
            )
        return self._store.get(row.vm_id, name)

    async def _split_brain_guard(self, row: ReplicationRow, force: bool) -> str:
        """Ask the primary whether the VM runs there; returns what was found, in words.

        Failing over is refused while the VM runs on its primary, and also whenever the
        primary cannot be asked for another reason than being unreachable: its port unknown,
        TLS or authorization refused, an error. Only an unreachable primary (the disaster an
        unplanned failover is for) lets the failover go on without ``--force``.
        """
        primary = row.primary_server
        if force:
            return f"the primary {primary} was not asked whether {row.vm_name} runs there (--force)"
        if row.peer_port is None:
            raise InvalidState(
                f"cannot ask the primary {primary} whether {row.vm_name} runs there: it had no "
                "certificate listener when replication was enabled, so its port is unknown. Make "
                f"sure the VM is off on {primary}, then fail over with --force"
            )
        refused = (
            f"cannot ask the primary {primary} whether {row.vm_name} runs there ({{}}); make sure "
            "it is off there, then fail over with --force"
        )
        try:
            address = peer_address(
                self._ctx.config, primary, row.peer_port, row.authentication_type,
                row.settings.encrypt,
            )  # fmt: skip
            async with open_peer(address, self._ctx.config.credentials, 5) as peer:
                answer = await peer.vm_state(p.VmRequest(row.vm_id))
        except PeerConnectionFailed as e:
            if e.stage != UNREACHABLE:
                raise InvalidState(refused.format(e.message)) from e
            return f"the primary {primary} is unreachable ({e.message}), so it was not asked"
        except VmrError as e:
            raise InvalidState(refused.format(e.message)) from e
        if answer.state == "Running":
            raise InvalidState(
                f"VM {row.vm_name} is running on its primary server {primary}: failing over now "
                "would run it twice (split brain); stop it there, or use --force"
            )
        return f"the primary {primary} says {row.vm_name} is {answer.state}"

    async def stop(self, row: ReplicationRow) -> None:
        """Cancel: the replica is as it was; the VM runs on its chain's tip no more."""
        allows(row, Command.CANCEL_FAILOVER)
        if self._ctx.journal.entries(COMPLETE, subject=row.vm_id) or self._completing(row):
            raise InvalidState(
                f"the failover of {row.vm_name} is being completed (its newer recovery points "
                f"may be deleted already): finish it with `failover complete {row.vm_name}`"
            )
        self._owner_only(row, "cancel the failover")
        await self._vms.runtime.ensure_off(row.vm_id)
        # A replica VM exists in the hypervisor only while failed over (libvirt: no domain to
        # `virsh start` behind the agent's back).
        await self._ctx.driver.forget(row.vm_id)
        with self._ctx.stores.db.tx() as tx:
            self._vms.set_disks(tx, row.vm_id, [c.tip for c in chains(self._ctx, row)])
            move(self._ctx, tx, row, Command.CANCEL_FAILOVER, failover_point=None)
            self._ctx.events.record(
                "failover-stopped",
                f"failover of {row.vm_name} cancelled; the replica is as it was",
                row.vm_name,
                tx=tx,
            )
        shutil.rmtree(Path(str(row.storage_dir)) / "failover", ignore_errors=True)
        self._share(row)

    async def complete(self, row: ReplicationRow) -> ReplicationRow:
        allows(row, Command.COMPLETE_FAILOVER)
        self._owner_only(row, "complete the failover")
        point = row.failover_point
        if point is None:
            raise InvalidState(f"there is no failover of {row.vm_name} to complete")
        # Journaled before the first file goes: once a newer point is deleted, the failover can
        # only be completed, never cancelled back onto that chain (a restart finishes it).
        if not self._ctx.journal.entries(COMPLETE, subject=row.vm_id):
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.begin(tx, COMPLETE, row.vm_id, {"point": point})
        if self._ctx.cluster is not None:  # and beside the chains, for a node taking over
            handoff.begin_completion(Path(str(row.storage_dir)), point)
        await self._complete(row, point)
        return self._store.get(row.vm_id, row.vm_name)

    def _completing(self, row: ReplicationRow) -> bool:
        """In a cluster: a completion the VM's former owner began (marked beside the chains)."""
        return (
            self._ctx.cluster is not None
            and bool(row.storage_dir)
            and handoff.completing(Path(str(row.storage_dir))) == row.failover_point
        )

    async def _complete(self, row: ReplicationRow, point: int) -> None:
        """Delete ``tip`` and the points above ``point``, then record it; repeatable. Top
        down, so that what a repeated run reads (its ranges) always has its backing files."""
        await self._save_changes_above_point(row)
        for chain in chains(self._ctx, row):
            chain.tip.unlink(missing_ok=True)
            faults.hit("failover.mid_complete")  # tip gone, the newer points not yet
            for other in reversed(chain.point_ids()):
                if other > point:
                    chain.rp_path(other).unlink(missing_ok=True)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.points.keep_only(tx, row.vm_id, point)
            move(self._ctx, tx, row, Command.COMPLETE_FAILOVER)
            self._ctx.journal.end(tx, COMPLETE, row.vm_id)
            self._ctx.events.record(
                "failover-completed",
                f"failover of {row.vm_name} completed on point {point}; other recovery points deleted",
                row.vm_name,
                tx=tx,
            )
        self._share(row)
        handoff.end_completion(Path(str(row.storage_dir)))

    async def _finish_complete(self, entry: JournalEntry) -> None:
        """A ``failover complete`` a crash cut short: finished, as its deletes may have begun."""
        row = self._store.find(entry.subject)
        point = entry.data.get("point")
        if row is not None and self._finished_elsewhere(row, point):
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry.id)
            self._ctx.events.record(
                "recovered",
                f"an interrupted failover complete of {row.vm_name} was finished by the node "
                "that owns it now",
                row.vm_name,
            )  # fmt: skip
            return
        if (
            row is not None
            and row.state == State.FAILED_OVER_WAITING
            and row.failover_point is not None
            and row.failover_point == point
            and row.storage_dir
        ):
            await self._complete(row, row.failover_point)
            self._ctx.events.record(
                "recovered", f"finished an interrupted failover complete of {row.vm_name}",
                row.vm_name,
            )  # fmt: skip
            return
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end_entry(tx, entry.id)

    def _finished_elsewhere(self, row: ReplicationRow, point: object) -> bool:
        """In a cluster, a former owner's entry (it died mid-completion, another node took the
        VM over): the shared facts no longer wait for this completion, so the node that owns
        the VM finished it (or moved on). This node must not write the chains or the facts."""
        shared = handoff.shared_replication(self._ctx, row)
        if shared is None:
            return False
        return (shared.get("state"), shared.get("failover_point")) != (
            State.FAILED_OVER_WAITING, point
        )  # fmt: skip
