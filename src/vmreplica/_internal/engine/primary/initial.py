"""Initial replication on the primary: a full copy of every replicated disk, with change tracking
starting at the same instant.

The data does not go through the HTTPS stream: the replica opens an import for it (initial-open)
and the driver copies a point-in-time view of the disks straight into it (for QEMU: NBD with TLS
from a fleecing export into the replica's new base images). initial-close then has the replica
adopt the images as its chains' base. A copy that fails or is interrupted leaves what it wrote
on the replica (engine/replica/kept.py), and its retry goes on as a compare against that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.connect import replica_address
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso, start_time_of
from vmreplica._internal.engine.laps import Laps
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.throttle import Throttle
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import DiskOwner, NbdCredentials, NbdPsk
from vmreplica._internal.store.replications import (
    COMPARED,
    COMPRESSED,
    KEPT,
    OFFLINE,
    SEED,
    ReplicationRow,
)
from vmreplica._internal.transport import answers, media
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import Peer, open_peer
from vmreplica.errors import InvalidArgument, InvalidState, StorageError, VmrError

log = logging.getLogger("vmreplica.primary")


class InitialReplication:
    def __init__(
        self, ctx: Context, vms: VmService, pending: PendingLog, run: Callable[[str], None],
        stop_task: Callable[[str], Awaitable[None]], throttle: Throttle,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._pending = pending
        self._run = run  # the scheduler's: start (or wake) the VM's replication task
        self._stop_task = stop_task  # the scheduler's: stop that task
        self._throttle = throttle
        self._store = ctx.stores.replications

    async def start(
        self, name: str, use_backup: bool = False, destination: str | None = None,
        start_time: str | None = None, compressed: bool = False,
    ) -> ReplicationRow:  # fmt: skip
        """``start-initial [--use-backup | --destination DIR | --compressed] [--start-time ISO]``."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.mode != "Primary":
            raise InvalidState(
                f"VM {name} is a replica here: start initial replication on its primary server"
            )
        if sum((use_backup, destination is not None, compressed)) > 1:
            raise InvalidArgument("--use-backup, --destination and --compressed exclude each other")
        if row.state == State.INITIAL_IN_PROGRESS and not (
            use_backup or destination or start_time or compressed
        ):
            # A copy that failed waits for the schedule to retry it: start it again now.
            with self._ctx.stores.db.tx() as tx:
                move(self._ctx, tx, row, Command.RETRY_INITIAL, send_failure=None, last_error=None)
            self._run(rec.id)
            return self._store.get(rec.id, name)
        compared = use_backup or compressed
        command = Command.START_INITIAL_FROM_COPY if compared else Command.START_INITIAL
        allows(row, command)
        kind: str | None = SEED if use_backup else COMPRESSED if compressed else None
        media_dir: Path | None = None
        if destination is not None:
            kind, media_dir = OFFLINE, _media_directory(destination)
        when = start_time_of(start_time) if start_time is not None else None
        if when is not None and when > datetime.now(UTC):
            self._store.update(
                rec.id, initial_at=when.isoformat(timespec="seconds"), initial_kind=kind,
                initial_media=None if media_dir is None else json.dumps({"path": str(media_dir)}),
            )  # fmt: skip
            self._ctx.events.record(
                "initial-replication-scheduled",
                f"initial replication of {name} scheduled for {when}", name,
            )  # fmt: skip
            self._run(rec.id)
            return self._store.get(rec.id, name)
        self.begin(row, command, kind, media_dir)
        self._run(rec.id)
        return self._store.get(rec.id, name)

    def begin(
        self, row: ReplicationRow, command: Command, kind: str | None, media_dir: Path | None
    ) -> None:
        how = {
            SEED: " from the copy on the replica: only the blocks that differ travel",
            OFFLINE: f" to offline media in {media_dir}",
            COMPRESSED: " as compressed deltas of the blocks that are not zero",
        }.get(kind or "", "")
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, command, initial_progress=0.0, last_error=None,
                 send_failure=None, initial_at=None, initial_kind=kind,
                 initial_media=None if media_dir is None else json.dumps({"path": str(media_dir)}),
                 resync_next=None, resync_progress=0.0 if kind in COMPARED else None)  # fmt: skip
            self._ctx.events.record(
                "initial-replication-started", f"initial replication of {row.vm_name} started{how}",
                row.vm_name, tx=tx,
            )  # fmt: skip

    def start_scheduled(self, row: ReplicationRow) -> None:
        """A scheduled start-initial whose time has come (the scheduler's)."""
        media_dir = json.loads(row.initial_media)["path"] if row.initial_media else None
        command = (
            Command.START_INITIAL_FROM_COPY
            if row.initial_kind in COMPARED
            else Command.START_INITIAL
        )
        self.begin(row, command, row.initial_kind, None if media_dir is None else Path(media_dir))

    async def stop(self, name: str) -> ReplicationRow:
        """``stop-initial``: an initial replication of any kind, running or scheduled, stops; the
        replica keeps what it had before it (nothing, or the seed copy)."""
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.mode != "Primary":
            raise InvalidState(
                f"VM {name} is a replica here: stop initial replication on its primary"
            )
        if row.state == State.READY_FOR_INITIAL and row.initial_at is not None:
            self._store.update(rec.id, initial_at=None, initial_kind=None, initial_media=None)
            self._ctx.events.record(
                "initial-replication-stopped", f"scheduled initial replication of {name} cancelled",
                name,
            )  # fmt: skip
            return self._store.get(rec.id, name)
        if row.state != State.INITIAL_IN_PROGRESS:
            # An initial replication from the replica's copy runs as a resynchronization.
            allows(row, Command.STOP_INITIAL)
            raise InvalidState(f"no initial replication of {name} is under way (state {row.state})")
        await self._stop_task(rec.id)  # the copy's clean-up closes the replica's import
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, self._store.get(rec.id, name), Command.STOP_INITIAL,
                 initial_progress=None, initial_kind=None, initial_media=None, sequence=0,
                 acked_sequence=0, send_failure=None, last_error=None)  # fmt: skip
            self._ctx.events.record(
                "initial-replication-stopped", f"initial replication of {name} stopped", name,
                tx=tx,
            )  # fmt: skip
        return self._store.get(rec.id, name)

    async def run(self, row: ReplicationRow) -> None:
        """Copy every replicated disk and record the relationship as replicating."""
        started = datetime.now(UTC)
        laps = Laps()
        peer = replica_address(self._ctx.config, row)
        async with open_peer(peer, self._ctx.config.credentials, timeout=120.0) as replica:
            status = await replica.status(p.StatusRequest(row.vm_id))
            laps.lap("connect")
            if row.initial_kind == OFFLINE:
                size = await self._export(row, replica)
            elif status.sequence >= 1:
                # The replica adopted the copy before a crash lost its acknowledgement here. The
                # tracking of generation 1 started when that copy began; settle() checks it.
                size = row.initial_size or 0
            elif status.kept_initial and row.initial_kind is None:
                self._resume_from_kept(row)
                return
            else:
                size = await self._copy(row, replica, laps)
        now = now_iso()
        with self._ctx.stores.db.tx() as tx:
            move(
                self._ctx, tx, self._store.get(row.vm_id, row.vm_name), Command.FINISH_INITIAL,
                sequence=1, generation=1, acked_sequence=1, initial_progress=100.0,
                initial_size=size, last_replication_time=now, last_replication_size=size,
                send_failure=None, last_error=None, initial_kind=None, initial_media=None,
            )  # fmt: skip
            self._ctx.stores.cycles.record(tx, row.vm_id, started.isoformat(), True, 1, size, 0)
            self._ctx.events.record(
                "initial-replication-done",
                f"initial replication of {row.vm_name} done ({size} bytes)",
                row.vm_name,
                tx=tx,
            )
        self._pending.clear(row.vm_id)

    def _resume_from_kept(self, row: ReplicationRow) -> None:
        """The replica kept what an earlier attempt wrote (engine/replica/kept.py): the copy
        goes on as a compare against it, as from a seed, in one step that a crash leaves either
        undone (the next retry asks again) or done (the scheduler runs the compare)."""
        done = row.initial_progress or 0.0
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.RESUME_INITIAL_FROM_KEPT, initial_kind=KEPT,
                 resync_next=None, resync_progress=0.0, last_error=None,
                 send_failure=None)  # fmt: skip
            self._ctx.events.record(
                "initial-replication-resumed",
                f"initial replication of {row.vm_name} resumes from the {done:.0f}% already on "
                "the replica: both sides hash their disks and only the blocks that differ travel",
                row.vm_name,
                tx=tx,
            )
        log.info("initial copy of %s: resuming from what the replica kept", row.vm_name)
        self._run(row.vm_id)  # at once, not an interval later

    async def _export(self, row: ReplicationRow, replica: Peer) -> int:
        """Offline media: a point-in-time copy of every disk into the destination, its manifest,
        then the replica told to keep the deltas until the media is imported there."""
        directory = Path(json.loads(str(row.initial_media))["path"])
        rec = self._vms.find(row.vm_name)
        driver = self._ctx.driver
        disks = [rec.disks[i] for i in row.disks]
        fmts = [rec.format_of(i) for i in row.disks]
        pairs = list(zip(disks, fmts, strict=True))
        progress = self._progress(row, [await driver.virtual_size(*d) for d in pairs])
        _check_media_space(directory, sum([await driver.required_size(*d) for d in pairs]))
        files = [directory / media.disk_name(n) for n in range(len(disks))]
        entries = []
        async with self._ctx.locks.vm(rec.id):
            owner = DiskOwner(
                rec.name, rec.disks, row.disks, self._vms.run_dir(rec.id),
                self._vms.runtime.process(rec.id), vm_id=rec.id, formats=rec.formats,
            )  # fmt: skip
            async with driver.point_in_time(owner, generation=1) as source:
                for n, file in enumerate(files):
                    (directory / media.MANIFEST).unlink(missing_ok=True)
                    file.unlink(missing_ok=True)
                    await driver.export_to_file(source, n, file, functools.partial(progress, n))
                    faults.hit("primary.mid_media_export")
                    size, digest = await asyncio.to_thread(media.file_digest, file)
                    entries.append(
                        media.MediaDisk(
                            n, await driver.virtual_size(disks[n], fmts[n]), size, digest
                        )
                    )
        manifest = media.MediaManifest(
            vm_id=row.vm_id, vm_name=row.vm_name, primary_server=self._ctx.host,
            created=now_iso(), disks=tuple(entries),
        )  # fmt: skip
        await asyncio.to_thread(media.write_manifest, directory, manifest)
        await replica.initial_offline(p.InitialOfflineRequest(row.vm_id, manifest))
        log.info("initial replication of %s written to %s", row.vm_name, directory)
        return sum(e.file_size for e in entries)

    async def _copy(self, row: ReplicationRow, replica: Peer, laps: Laps) -> int:
        rec = self._vms.find(row.vm_name)
        driver, tls = self._ctx.driver, self._ctx.config.tls
        address = replica.address
        disks = [rec.disks[i] for i in row.disks]
        run_dir = self._vms.run_dir(rec.id)
        # The replica's open is the longest step before the copy: it goes as soon as it can,
        # with the sizes read beside it and tracking started while it runs.
        fmts = [rec.format_of(i) for i in row.disks]
        sizing = asyncio.ensure_future(asyncio.gather(*map(driver.virtual_size, disks, fmts)))
        opening: asyncio.Future[tuple[answers.InitialOpenAnswer, bytes | None]] | None = None
        closed = False
        try:
            required = sum(await asyncio.gather(*map(driver.required_size, disks, fmts)))
            opening = asyncio.ensure_future(
                replica.initial_open(p.InitialOpenRequest(row.vm_id, required))
            )
            await faults.ahit("primary.initial_open_sent")  # the sizes still being read
            progress = self._progress(row, list(await sizing))
            laps.lap("sizes")
            async with self._ctx.locks.vm(rec.id):  # an off VM stays off while it is read
                owner = DiskOwner(
                    rec.name,
                    rec.disks,
                    row.disks,
                    run_dir,
                    self._vms.runtime.process(rec.id),
                    vm_id=rec.id,
                    formats=rec.formats,
                )
                async with driver.point_in_time(owner, generation=1) as source:
                    laps.lap("tracking")
                    await faults.ahit("primary.before_initial_copy")
                    opened, secret = await opening
                    laps.lap("replica open")
                    creds: NbdCredentials = (
                        tls if secret is None else NbdPsk(p.psk_username(row.vm_id), secret)
                    )
                    if len(opened.exports) != len(disks):
                        raise InvalidState(
                            f"the replica offers {len(opened.exports)} disks, {row.vm_name} has "
                            f"{len(disks)}"
                        )
                    for disk, export in enumerate(opened.exports):
                        await driver.copy_to(
                            source, disk, address.address, opened.port, export, creds,
                            address.fqdn, run_dir, functools.partial(progress, disk),
                            self._throttle.copy_rate(row.vm_id),
                        )  # fmt: skip
                    laps.lap("copy")
            faults.hit("primary.after_initial_copy")
            answer = await replica.initial_close(p.InitialCloseRequest(row.vm_id, ok=True))
            closed = True
            laps.lap("finish")
            prepare = sum(laps[n] for n in ("sizes", "tracking", "replica open"))
            log.info(
                "initial copy of %s: prepare %.2f s, copy %.2f s, finish %.2f s (%s)",
                row.vm_name, prepare, laps["copy"], laps["finish"], laps,
            )  # fmt: skip
            return answer.size
        finally:
            for task in (sizing, opening):
                if task is not None:
                    task.cancel()  # nothing, when it is done
                    with contextlib.suppress(BaseException):
                        await task
            if opening is not None and not closed:
                # Even when the open was cut short here: the replica may have finished it, and
                # its lock on the VM puts this close after the open.
                with contextlib.suppress(VmrError):
                    await replica.initial_close(p.InitialCloseRequest(row.vm_id, ok=False))

    def _progress(self, row: ReplicationRow, sizes: list[int]) -> Callable[[int, float], None]:
        """Per-disk percentages in, the VM's weighted percentage stored (at most twice a second)."""
        weights = [s / (sum(sizes) or 1) for s in sizes]
        done = [0.0] * len(sizes)
        last = [0.0]

        def progress(disk: int, percent: float) -> None:
            done[disk] = percent
            now = time.monotonic()
            if now - last[0] > 0.5:
                last[0] = now
                total = sum(w * d for w, d in zip(weights, done, strict=True))
                self._store.update(row.vm_id, initial_progress=round(min(total, 99.0), 1))

        return progress


def _media_directory(destination: str) -> Path:
    """An existing directory that holds no media yet, checked when the operator asks."""
    directory = Path(destination).absolute()
    if not directory.is_dir():
        raise InvalidArgument(f"--destination {destination}: not a directory")
    if (directory / media.MANIFEST).exists():
        raise InvalidArgument(
            f"--destination {destination} already holds initial media: use an empty directory"
        )
    return directory


def _check_media_space(directory: Path, required: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise StorageError(f"cannot use {directory} for the media: {e.strerror or e}") from e
    if required > free:
        raise StorageError(
            f"disk full: the media needs {required} bytes, {free} are free in {directory}"
        )
