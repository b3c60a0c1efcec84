"""The old primary's side of a reverse, and of a replica's split-brain check.

Asked by the host its VM failed over to, the old primary names what it may hold that the new
primary does not (its current generation's ranges and the deltas still in its pending log), or
says that its tracking was lost; then its disks move into replica chains (journal kind
``become-replica``, moved back if a crash interrupts it).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from vmreplica._internal import definition, faults
from vmreplica._internal import extents as ext
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.primary import Primary
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.common import chain_dir, redirect_if_elsewhere
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.engine.vms.formats import CHAIN_FORMAT
from vmreplica._internal.files import fsync_dir, write_atomic
from vmreplica._internal.ports.hypervisor import DiskOwner
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import answers
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import (
    AccessDenied,
    InvalidState,
    NotFound,
    ResyncRequired,
    StorageError,
    VmrError,
)

log = logging.getLogger("vmreplica.failover")


class OldPrimary:
    def __init__(self, ctx: Context, vms: VmService, primary: Primary) -> None:
        self._ctx = ctx
        self._vms = vms
        self._primary = primary
        self._store = ctx.stores.replications
        ctx.journal.register("become-replica", self._roll_back)

    async def become_replica(
        self, authz: Authorization, peer_names: list[str], req: p.ReverseRequest
    ) -> answers.ReverseAnswer:
        vm_id = req.vm_id
        await redirect_if_elsewhere(self._ctx, vm_id)  # in a cluster: the owner answers
        row = self._store.find(vm_id)
        if row is not None and _converted_for(row, peer_names):
            # An earlier request converted this host, and its answer was lost (the new primary
            # died, or the link): what this host held then is not known any more, so the new
            # primary resynchronizes, rather than finding no primary to reverse ever again.
            lost = "an earlier reverse made it the replica, and what it held is not known"
            return answers.ReverseAnswer(False, lost, {})
        if row is None or row.mode != "Primary":
            raise NotFound(f"{self._ctx.host} is not the primary of VM {req.vm_name}")
        if row.replica_server not in peer_names:
            raise InvalidState(
                f"VM {row.vm_name} replicates to {row.replica_server}, not to {peer_names[0]}"
            )
        allows(row, Command.BECOME_REPLICA)  # before anything moves
        _chain_formats_only(self._vms.find(row.vm_name), row, self._ctx.host, peer_names[0])
        running = f"VM {row.vm_name} is running on {self._ctx.host}: stop it before reversing"
        if self._vms.find(row.vm_name).state != "Off":
            raise InvalidState(running)
        await self._primary.scheduler.stop_vm(vm_id)
        try:
            async with self._ctx.locks.vm(vm_id):  # no start, and no cycle, while disks move
                rec, row = self._vms.find(row.vm_name), self._store.get(vm_id, row.vm_name)
                if rec.state != "Off":
                    raise InvalidState(running)
                intact, reason, extents = await self._tracking_intact(rec, row)
                if intact and any(extents.values()) and not req.failback_extents:
                    # An older new primary would ignore the ranges and silently leave them stale.
                    reason = "it holds writes that were never replicated"
                    intact, extents = False, {}
                await self._convert(authz, peer_names, req, rec, row)
                if self._ctx.cluster is not None:  # the chains moved: the registry and the facts
                    storage = Path(str(self._store.get(vm_id, row.vm_name).storage_dir))
                    await self._ctx.cluster.adopt(vm_id, storage)
                    handoff.export(self._ctx, vm_id)
        except BaseException:
            # Refused or failed before the disks moved (the VM runs, its tracking or the
            # conversion failed): still the primary, whose cycles go on.
            current = self._store.find(vm_id)
            if current is not None and current.mode == "Primary":
                self._primary.scheduler.run(vm_id)
            raise
        return answers.ReverseAnswer(intact, reason, extents)

    async def _tracking_intact(
        self, rec: VmRecord, row: ReplicationRow
    ) -> tuple[bool, str | None, dict[str, list[list[int]]]]:
        """Whether this host can name every range the replica may lack, and those ranges: the
        bits of the current generation (writes since the last delta was cut) and the clusters of
        the deltas still in the pending log (cut, maybe never applied)."""
        if row.state == State.WAITING_FOR_RESYNC:
            return False, "its change tracking was lost", {}
        owner = DiskOwner(
            rec.name,
            rec.disks,
            row.disks,
            self._vms.run_dir(rec.id),
            None,
            vm_id=rec.id,
            formats=rec.formats,
        )
        try:
            async with self._ctx.driver.session(owner) as session:
                await session.settle(row.generation)
                changed = await session.dirty_extents(row.generation)
        except ResyncRequired as e:
            return False, e.message, {}
        pending = self._primary.pending
        for sequence, delta_dir in pending.entries(row.vm_id):
            if pending.manifest(delta_dir) is None:
                continue  # never committed: the generation still holds its changes (settle)
            for n in range(len(row.disks)):
                try:
                    changed[n] += await self._ctx.driver.allocated(disk_file(delta_dir, n))
                except VmrError as e:
                    return False, f"pending delta {sequence} cannot be read ({e})", {}
        return True, None, ext.to_json(dict(enumerate(changed)))

    async def _convert(
        self, authz: Authorization, peer_names: list[str], req: p.ReverseRequest, rec: VmRecord,
        row: ReplicationRow,
    ) -> None:  # fmt: skip
        """Journaled: the disks move into replica chains; a crash moves them back."""
        vm_id = row.vm_id
        root = authz.storage_location / row.vm_name / f"rev-{uuid.uuid4().hex[:8]}"
        moves = [
            (str(rec.disks[i]), str(self._ctx.driver.chain(chain_dir(root, n)).base))
            for n, i in enumerate(row.disks)
        ]
        # A replica VM has no hypervisor definition until a failover (libvirt: its domain and
        # checkpoints go, while its disks are still where the domain has them). Tracking was
        # read above; a rollback after a crash leaves the VM to a resynchronization. Its own
        # definition (a libvirt domain's XML) is kept beside the chains, as a replica keeps
        # its primary's: a failback defines the domain from it again.
        _renamable(moves, root, row.vm_name)  # before anything changes
        full, own = await self._definition(row)
        await self._ctx.driver.forget(vm_id)
        with self._ctx.stores.db.tx() as tx:
            entry = self._ctx.journal.begin(
                tx, "become-replica", vm_id, {"root": str(root), "moves": moves, "definition": full}
            )
        tips: list[Path] = []
        try:
            for src, dst in moves:
                Path(dst).parent.mkdir(parents=True)
                os.replace(src, dst)
                chain = self._ctx.driver.chain(Path(dst).parent)
                await chain.recover()  # creates tip.qcow2 above the existing base
                tips.append(chain.tip)
            _sync_moves(moves, root)  # durable before the record names the chains
            if own is not None:
                try:
                    write_atomic(root / definition.FILE_NAME, own.encode())
                except OSError as e:
                    log.warning("cannot keep the domain XML of %s: %s", row.vm_name, e)
            faults.hit("reverse.after_convert")
        except BaseException as e:
            # The agent lives on (a qemu-img killed, a full disk): the start-up recovery would
            # not run, and the VM's record would name disks that were moved away.
            _move_back(moves, root)
            await self._restore(full, row.vm_name)
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry)
            if isinstance(e, OSError):  # become_replica runs the VM's cycles again
                raise StorageError(
                    f"cannot move the disks of {row.vm_name} into {root}: {e.strerror or e}"
                ) from e
            raise
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end(tx, "become-replica", vm_id)
            self._vms.set_disks(tx, vm_id, tips)
            self._ctx.stores.cycles.clear(tx, vm_id)
            move(
                self._ctx, tx, row, Command.BECOME_REPLICA, mode="Replica",
                primary_server=peer_names[0], replica_server=self._ctx.host, sequence=0,
                acked_sequence=0, generation=0, storage_dir=str(root),
                trust_group=authz.trust_group, auth_entry=authz.entry,
                authentication_type=authz.authentication_type, peer_port=req.new_primary_port, last_replication_time=now_iso(),
                send_failure=None, last_error=None, disks=tuple(range(len(row.disks))),
            )  # fmt: skip
            self._ctx.events.record(
                "replication-reversed",
                f"{row.vm_name} is now a replica of {peer_names[0]}",
                row.vm_name,
                tx=tx,
            )
        self._primary.pending.forget(vm_id)
        faults.hit("reverse.after_become_replica")  # recorded, not yet answered

    async def _definition(self, row: ReplicationRow) -> tuple[str | None, str | None]:
        """The VM's own definition (defined again should the disks not move), and that trimmed
        to its replicated disks: None when there is none or a replica could not be defined from
        it (the VM is then generated from its record)."""
        try:
            xml = await self._ctx.driver.definition(row.vm_id)
        except VmrError as e:
            log.warning("the domain XML of %s is not kept: %s", row.vm_name, e)
            return None, None
        if xml is None:
            return None, None
        try:
            definition.check(xml, row.vm_id)
            return xml, definition.only_disks(xml, row.disks)
        except VmrError as e:
            log.warning("the domain XML of %s is not kept: %s", row.vm_name, e)
            return xml, None

    async def _roll_back(self, entry: JournalEntry) -> None:
        _move_back(entry.data["moves"], entry.data["root"])
        await self._restore(entry.data.get("definition"), entry.subject)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end_entry(tx, entry.id)
        row = self._store.find(entry.subject)
        if row is not None:
            self._primary.scheduler.run(row.vm_id)
            self._ctx.events.record(
                "recovered", f"rolled back an interrupted reverse of {row.vm_name}", row.vm_name
            )

    async def _restore(self, xml: str | None, vm: str) -> None:
        """The domain forgotten before the disks moved, defined again once they are back."""
        if xml is not None:
            try:
                await self._ctx.driver.restore(xml)
            except VmrError as e:
                log.warning("cannot define the domain of %s again: %s", vm, e)

    async def vm_state(
        self, authz: Authorization, peer_names: list[str], req: p.VmRequest
    ) -> answers.VmStateAnswer:
        """For a peer's split-brain check: only a peer this VM replicates with, or one of the
        replica's trust group, may learn whether it runs."""
        row = self._store.find(req.vm_id)
        related = row is not None and (
            row.replica_server in peer_names
            or row.primary_server in peer_names
            or (
                authz.by_entry
                and row.trust_group is not None
                and row.trust_group == authz.trust_group
            )
        )
        if row is None or not related:
            raise AccessDenied(
                f"not authorized: {peer_names[0] if peer_names else 'this peer'} has no "
                f"replication relationship with VM {req.vm_id} on {self._ctx.host}"
            )
        rec = self._vms.by_id(req.vm_id)
        return answers.VmStateAnswer("Unknown" if rec is None else rec.state)


def _chain_formats_only(rec: VmRecord, row: ReplicationRow, host: str, peer: str) -> None:
    """A reverse moves the disks into replica chains, whose images are qcow2: a raw disk
    there would be opened as qcow2 by its first bytes (the guest's), with a backing file of
    the guest's choosing (drivers/libvirt/raw.py)."""
    for i in row.disks:
        if rec.format_of(i) != CHAIN_FORMAT:
            raise InvalidState(
                f"cannot reverse replication of {row.vm_name} onto {host}: its disk "
                f"{rec.disks[i]} is {rec.format_of(i) or 'of unknown format'} (not qcow2), and a "
                "reverse moves it into a replica chain: remove the VM's replication on "
                f"{host}, then enable replication of it anew on {peer}"
            )


def _renamable(moves: list[tuple[str, str]], root: Path, vm_name: str) -> None:
    """Each disk is renamed into its chain: refused first if the storage location is on
    another file system (a rename cannot cross one; a copy would double the space)."""
    there = root
    while not there.exists() and there != there.parent:
        there = there.parent
    try:
        device = there.stat().st_dev
        elsewhere = [src for src, _ in moves if os.stat(src).st_dev != device]
    except OSError as e:
        raise StorageError(f"cannot reverse {vm_name}: {e.filename}: {e.strerror}") from e
    if elsewhere:
        raise StorageError(
            f"cannot reverse {vm_name}: its disk {elsewhere[0]} is on another file system than "
            f"the replica storage location {there} (the disks move into replica chains there): "
            "name a storage location on the disks' file system in the authorization entry"
        )


def _move_back(moves: list[tuple[str, str]], root: Path | str) -> None:
    """Undo a become-replica's moves: each disk back where the VM has it (durable before the
    journal entry ends), the chains gone."""
    for src, dst in moves:
        if Path(dst).exists() and not Path(src).exists():
            os.replace(dst, src)
            fsync_dir(Path(src).parent)
    shutil.rmtree(root, ignore_errors=True)


def _sync_moves(moves: list[tuple[str, str]], root: Path) -> None:
    """The renames into the chains, and the directories made for them, made durable."""
    dirs = {Path(src).parent for src, _ in moves} | {Path(dst).parent for _, dst in moves}
    for path in [*sorted(dirs), root, root.parent, root.parent.parent]:
        fsync_dir(path)


def _converted_for(row: ReplicationRow, peer_names: list[str]) -> bool:
    """This host became the replica of the asking peer by a reverse, and nothing came since:
    no other relationship is a replica at sequence 0 while Replicating."""
    return (
        row.mode == "Replica"
        and row.primary_server in peer_names
        and row.state == State.REPLICATING
        and row.sequence == 0
    )
