"""Seeding: a copy of the VM that reached the replica host by other means (a restored backup,
an old replica, a copy carried by hand) becomes the start of its replica, so that initial
replication compares instead of copying (Hyper-V's ``Enable-VMReplication -AsReplica`` and
``Start-VMInitialReplication -UseBackup``).

``replication enable VM --as-replica`` registers the copy, an ordinary VM of this host, as the
seed of a replica: a relationship in WaitingForInitialReplication without storage yet. When the
primary enables replication of the VM of that name, its disks move into replica chains, as the
``base`` of each (journal kind ``seed-adopt``, moved back if a crash interrupts it), and the VM
takes the primary's id. ``start-initial --use-backup`` on the primary then resynchronizes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmreplica._internal import faults, validate
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica.common import (
    BOOT_DIR,
    REPLICA,
    chain_dir,
    register_replica,
)
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.engine.vms.formats import CHAIN_FORMAT
from vmreplica._internal.files import fsync_dir
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import SEED, ReplicationRow, Settings
from vmreplica._internal.transport import answers
from vmreplica._internal.transport import protocol as p
from vmreplica.errors import AccessDenied, InvalidArgument, InvalidState, StorageError

ANY_PRIMARY = ""  # a seed registered without --allowed-primary: any authorized primary


class Seeds:
    def __init__(self, ctx: Context, vms: VmService) -> None:
        self._ctx = ctx
        self._vms = vms
        self._store = ctx.stores.replications
        ctx.journal.register("seed-adopt", self._roll_back)

    async def register(self, name: str, allowed_primary: str | None) -> ReplicationRow:
        """``replication enable VM --as-replica [--allowed-primary FQDN]`` on the replica host."""
        rec = self._vms.find(name)
        if allowed_primary is not None:
            allowed_primary = validate.fqdn(allowed_primary, "--allowed-primary")
        if self._store.find(rec.id) is not None:
            raise InvalidState(f"VM {name} already has a replication relationship")
        if rec.state != "Off":
            raise InvalidState(f"VM {name} is running: stop it before making it a replica")
        for i, disk in enumerate(rec.disks):
            if rec.format_of(i) not in (None, CHAIN_FORMAT):
                # Moved into a replica chain, it would be opened as qcow2 by its first bytes,
                # which are its guest's (drivers/libvirt/raw.py).
                raise InvalidArgument(
                    f"disk {disk} of VM {name} is {rec.format_of(i)}: a copy to start from "
                    "becomes a replica chain's base, which is qcow2; convert it first "
                    "(qemu-img convert -O qcow2) and give the VM the converted copy"
                )
            await self._ctx.driver.check_standalone(disk)
        row = ReplicationRow(
            vm_id=rec.id, vm_name=name, mode=REPLICA, state=State.WAITING_FOR_INITIAL,
            primary_server=allowed_primary or ANY_PRIMARY, replica_server=self._ctx.host,
            replica_port=0, authentication_type="certificate", settings=Settings(),
            disks=tuple(range(len(rec.disks))), trust_group=None, auth_entry=None,
            storage_dir=None, sequence=0, acked_sequence=0, generation=0,
            last_replication_time=None, last_replication_size=None, initial_progress=None,
            initial_size=None, enabled_time=now_iso(), stats_since=now_iso(), last_error=None,
            send_failure=None, last_rp_time=None, next_rp_id=1, initial_kind=SEED,
        )  # fmt: skip
        with self._ctx.stores.db.tx() as tx:
            self._store.insert(tx, row)
            self._ctx.events.record(
                "replica-seed-registered",
                f"VM {name} waits to become the replica of "
                f"{allowed_primary or 'any authorized primary'}; its disks are the copy that "
                "initial replication (start-initial --use-backup) compares against",
                name,
                tx=tx,
            )
        return self._store.get(rec.id, name)

    def seed_for(self, name: str) -> tuple[VmRecord, ReplicationRow] | None:
        """The VM registered as the seed of ``name``'s replica, if there is one."""
        rec = self._ctx.stores.vms.by_name(name)
        if rec is None:
            return None
        row = self._store.find(rec.id)
        if row is None or row.mode != REPLICA or row.initial_kind != SEED:
            return None
        return (rec, row) if row.storage_dir is None else None

    async def adopt(
        self, authz: Authorization, peer_names: list[str], req: p.EnableRequest,
        rec: VmRecord, seed: ReplicationRow, settings: Settings,
    ) -> answers.EnableAnswer:  # fmt: skip
        """The primary's ``enable`` for a VM that has a seed here: the seed's disks become the
        bases of the replica chains, and the VM takes the primary's id and configuration."""
        name = rec.name
        if seed.primary_server not in (ANY_PRIMARY, *peer_names):
            self._ctx.refusals["seed-primary"] += 1
            raise AccessDenied(
                f"VM {name} on {self._ctx.host} waits to become the replica of "
                f"{seed.primary_server}, not of {peer_names[0]}"
            )
        if rec.state != "Off":
            raise InvalidState(f"the copy of {name} on {self._ctx.host} is running: stop it first")
        sizes = [await self._ctx.driver.virtual_size(d) for d in rec.disks]
        if sizes != list(req.disk_sizes):
            raise InvalidArgument(
                f"the copy of {name} on {self._ctx.host} has disks of {sizes} bytes, the "
                f"primary's replicated disks are {list(req.disk_sizes)}: it cannot seed this replica"
            )
        for disk in rec.disks:
            await self._ctx.driver.check_standalone(disk)
        storage = validate.child_path(authz.storage_location, name)
        if storage.exists():
            raise InvalidState(
                f"replica storage {storage} already exists on {self._ctx.host}: remove it first"
            )
        moves = [
            (str(disk), str(self._ctx.driver.chain(chain_dir(storage, n)).base))
            for n, disk in enumerate(rec.disks)
        ]
        storage.mkdir(mode=0o700, parents=True)
        try:
            for source, _ in moves:
                if os.stat(source).st_dev != storage.stat().st_dev:
                    raise InvalidArgument(
                        f"the copy's disk {source} is on another file system than the replica "
                        f"storage {authz.storage_location}: move it there first (the disks are "
                        "moved into the replica's storage, not copied)"
                    )
        except BaseException:
            shutil.rmtree(storage, ignore_errors=True)
            raise
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(
                tx, "seed-adopt", seed.vm_id, {"root": str(storage), "moves": moves}
            )
        tips: list[Path] = []
        try:
            for src, dst in moves:
                Path(dst).parent.mkdir(mode=0o700)
                os.replace(src, dst)
                fsync_dir(Path(dst).parent)
                chain = self._ctx.driver.chain(Path(dst).parent)
                await chain.recover()  # creates tip.qcow2 above the seed, now base
                tips.append(chain.tip)
        except OSError as e:
            await self._undo(moves, storage)
            raise StorageError(f"cannot move the copy of {name} into {storage}: {e}") from e
        except BaseException:
            await self._undo(moves, storage)
            raise
        faults.hit("replica.after_seed_moved")
        boot = {k: v for k, v in (("kernel", req.kernel), ("initrd", req.initrd)) if v}
        if boot:
            (storage / BOOT_DIR).mkdir(mode=0o700, exist_ok=True)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end(tx, "seed-adopt", seed.vm_id)
            self._store.delete(tx, seed.vm_id)
            self._ctx.stores.vms.delete(tx, rec.id)
            register_replica(
                self._ctx, self._vms, tx, authz, peer_names, req, name, settings, storage, tips,
                initial_kind=SEED,
            )  # fmt: skip
            self._ctx.events.record(
                "replica-created",
                f"replica VM {name} created for primary {peer_names[0]} from the copy already "
                f"here (trust group {authz.trust_group}, storage {storage}); initial "
                "replication with --use-backup sends only the blocks that differ",
                name,
                tx=tx,
            )
        shutil.rmtree(self._vms.run_dir(rec.id), ignore_errors=True)
        return answers.EnableAnswer(str(storage), already=False)

    async def _undo(self, moves: list[tuple[str, str]], storage: Path) -> None:
        for src, dst in moves:
            if Path(dst).exists() and not Path(src).exists():
                os.replace(dst, src)
                fsync_dir(Path(src).parent)
        shutil.rmtree(storage, ignore_errors=True)
        for entry in self._ctx.journal.entries("seed-adopt"):
            if entry.data.get("root") == str(storage):
                with self._ctx.stores.db.tx() as tx:
                    self._ctx.journal.end_entry(tx, entry.id)

    async def _roll_back(self, entry: JournalEntry) -> None:
        """A crash while the copy's disks moved: they go back, and the seed waits as before."""
        await self._undo([(s, d) for s, d in entry.data["moves"]], Path(entry.data["root"]))
        self._ctx.events.record(
            "recovered",
            f"moved the copy's disks back after an interrupted enable (seed {entry.subject})",
        )
