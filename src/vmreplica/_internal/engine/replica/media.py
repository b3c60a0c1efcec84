"""Offline initial replication on the replica (Hyper-V's ``Import-VMInitialReplication``).

The primary wrote the initial copy to media and announced its manifest (``initial-offline``);
from then on its deltas arrive as usual, and this side keeps them, checked, in ``queued/<seq>``
of the replica's storage, acknowledging each. ``replication import-initial VM --path DIR`` checks
the media against the announced manifest (VM, disk sizes, file sizes, blake3) while copying it
off, makes each copy the base of its chain, and applies the queued deltas through the ordinary
journaled apply. Media refused for any reason changes nothing.

Journal kind ``media-import``: written once every copy is verified; a crash after it is
finished at start-up (every copy becomes its base, the queued deltas are journaled as applies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.common import (
    chains,
    check_not_quarantined,
    check_sender,
    redirect_if_elsewhere,
    replica_row,
    staging_dir,
)
from vmreplica._internal.engine.replica.recovery import ReplicaRecovery
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.files import fsync_dir
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import OFFLINE, ReplicationRow
from vmreplica._internal.transport import answers, media
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import IntegrityError, InvalidArgument, InvalidState

log = logging.getLogger("vmreplica.replica")

QUEUE_DIR = "queued"


def queued_dir(row: ReplicationRow, sequence: int) -> Path:
    return Path(str(row.storage_dir)) / QUEUE_DIR / str(sequence)


class MediaImport:
    def __init__(
        self, ctx: Context, vms: VmService, applier: Applier, recovery: ReplicaRecovery
    ) -> None:
        self._ctx = ctx
        self._vms = vms
        self._applier = applier
        self._recovery = recovery
        self._store = ctx.stores.replications
        ctx.journal.register("media-import", self._finish_entry)

    # -- from the primary --------------------------------------------------------------------

    async def announce(
        self, authz: Authorization, peer_names: list[str], req: p.InitialOfflineRequest
    ) -> answers.SequenceAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            row = replica_row(self._ctx, row.vm_id)
            check_not_quarantined(self._ctx, row)
            announced = json.dumps(req.media.to_json(), sort_keys=True)
            if row.initial_kind == OFFLINE and row.initial_media == announced:
                return answers.SequenceAnswer(row.sequence)  # a retried announcement
            waiting = row.state == State.WAITING_FOR_INITIAL
            if not waiting or (row.sequence != 0 and row.initial_kind != OFFLINE):
                raise InvalidState(
                    f"replica VM {row.vm_name} already has its initial copy (state {row.state})"
                )
            await self._check_fits(row, req.media)
            # Newer media (the primary wrote it again, after a crash or a stop): the deltas
            # kept so far follow the older media, and the primary sends anew from sequence 2.
            shutil.rmtree(Path(str(row.storage_dir)) / QUEUE_DIR, ignore_errors=True)
            self._store.update(row.vm_id, initial_kind=OFFLINE, initial_media=announced, sequence=1)
            self._ctx.events.record(
                "initial-media-announced",
                f"the initial copy of {row.vm_name} comes on offline media written "
                f"{req.media.created}: deltas are kept until `vmreplica replication "
                f"import-initial {row.vm_name} --path DIR` imports it",
                row.vm_name,
            )
            return answers.SequenceAnswer(1)

    async def queue(self, row: ReplicationRow, sequence: int, staging: Path, started: str) -> None:
        """Keep a received, checked delta until the media is imported; acknowledged once kept."""
        target = queued_dir(row, sequence)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(staging, target)
        fsync_dir(target.parent)
        size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
        with self._ctx.stores.db.tx() as tx:
            self._store.update(
                row.vm_id, tx, sequence=sequence, last_replication_time=now_iso(),
                last_replication_size=size,
            )  # fmt: skip
            self._ctx.stores.cycles.record(tx, row.vm_id, started, True, sequence, size)

    # -- the operator's import ---------------------------------------------------------------

    async def import_media(self, name: str, path: str) -> ReplicationRow:
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.mode != "Replica":
            raise InvalidState(f"VM {name} is not a replica on {self._ctx.host}")
        directory = Path(path).absolute()
        if not directory.is_dir():
            raise InvalidArgument(f"--path {path}: not a directory")
        async with self._ctx.locks.replica(row.vm_id):
            row = self._store.get(rec.id, name)
            if row.state != State.WAITING_FOR_INITIAL or row.initial_kind != OFFLINE:
                raise InvalidState(
                    f"replica VM {name} waits for no offline media (state {row.state}): start "
                    f"initial replication with --destination on its primary first"
                )
            check_not_quarantined(self._ctx, row)
            manifest = media.read_manifest(directory)
            expected = media.MediaManifest.from_json(json.loads(str(row.initial_media)))
            self._check_same(row, manifest, expected)
            staging = staging_dir(row, 1)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, mode=0o700)
            try:
                for disk in manifest.disks:
                    source = directory / media.disk_name(disk.index)
                    await asyncio.to_thread(
                        media.copy_verified, source, disk_file(staging, disk.index), disk
                    )
                    log.info("initial media of %s: disk %d verified", name, disk.index)
                for chain, disk in zip(chains(self._ctx, row), manifest.disks, strict=True):
                    copy = disk_file(staging, disk.index)
                    if await self._ctx.driver.virtual_size(copy) != disk.virtual_size:
                        raise IntegrityError(f"{copy.name} on the media is not of its disk's size")
                    await chain.check_incoming(copy)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.begin(
                    tx, "media-import", row.vm_id, {"staging": str(staging), "last": row.sequence}
                )
            await self._finish(row.vm_id)
        return self._store.get(rec.id, name)

    async def _finish(self, vm_id: str) -> None:
        """The verified copies become the bases, the state moves, and the queued deltas are
        journaled as ordinary applies, then applied; repeatable after a crash anywhere."""
        row = replica_row(self._ctx, vm_id)
        entry = self._ctx.journal.entries("media-import", subject=vm_id)[0]
        staging = Path(entry.data["staging"])
        for n, chain in enumerate(chains(self._ctx, row)):
            if disk_file(staging, n).exists():
                await chain.adopt_as_base(disk_file(staging, n))
        faults.hit("replica.mid_media_import")
        queued = sorted(
            int(d.name) for d in (Path(str(row.storage_dir)) / QUEUE_DIR).glob("*")
            if d.name.isdigit()
        )  # fmt: skip
        started = now_iso()
        with self._ctx.stores.db.tx() as tx:
            if row.state == State.WAITING_FOR_INITIAL:
                move(self._ctx, tx, row, Command.FINISH_INITIAL, initial_kind=None,
                     initial_media=None, last_rp_time=started)  # fmt: skip
            for sequence in queued:
                self._ctx.journal.begin(tx, "apply", vm_id, {
                    "sequence": sequence, "staging": str(queued_dir(row, sequence)),
                    "started": started,
                })  # fmt: skip
            self._ctx.journal.end_entry(tx, entry.id)
            self._ctx.events.record(
                "initial-media-imported",
                f"the initial copy of {row.vm_name} was imported from offline media; "
                f"{len(queued)} delta(s) received meanwhile are applied on top",
                row.vm_name,
                tx=tx,
            )
        shutil.rmtree(staging, ignore_errors=True)
        await self._recovery.replay_or_quarantine(vm_id, "applying the queued deltas")

    async def _finish_entry(self, entry: JournalEntry) -> None:
        if self._store.find(entry.subject) is None:
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry.id)
            return
        await self._finish(entry.subject)

    # -- checks ------------------------------------------------------------------------------

    async def _check_fits(self, row: ReplicationRow, manifest: media.MediaManifest) -> None:
        if manifest.vm_id != row.vm_id:
            raise InvalidArgument(f"the media's manifest is of another VM than {row.vm_name}")
        sizes = [await chain.virtual_size() for chain in chains(self._ctx, row)]
        if [d.virtual_size for d in manifest.disks] != sizes:
            raise InvalidArgument(
                f"the media holds disks of {[d.virtual_size for d in manifest.disks]} bytes; "
                f"replica VM {row.vm_name} has disks of {sizes}"
            )

    def _check_same(
        self, row: ReplicationRow, found: media.MediaManifest, expected: media.MediaManifest
    ) -> None:
        if found.vm_id != row.vm_id:
            raise InvalidArgument(
                f"the media is of VM {found.vm_name} ({found.vm_id}), not of {row.vm_name} "
                f"({row.vm_id})"
            )
        if [d.virtual_size for d in found.disks] != [d.virtual_size for d in expected.disks]:
            raise InvalidArgument(
                f"the media holds disks of {[d.virtual_size for d in found.disks]} bytes; "
                f"{row.vm_name}'s are {[d.virtual_size for d in expected.disks]}"
            )
        if found != expected:
            raise InvalidArgument(
                f"the media was written {found.created}, but the primary announced the media it "
                f"wrote {expected.created}: import that one (a newer export replaces an older)"
            )
