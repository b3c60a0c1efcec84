"""The primary side of replication: enabling, initial replication, the cycle scheduler, the
pending log and sending deltas to the replica.

The pending log is ``<state>/replication/<vm id>/pending/<sequence>/``: one directory per delta,
complete once its ``manifest.json`` exists. Deltas leave the log in order, each only after the
replica acknowledged it (or said it already has it). Change tracking rotates a generation of
bitmaps per cycle (see :mod:`vmreplica._internal.drivers.qemu.tracking`): the bitmap a delta was
cut from is dropped only after the delta is durably in the log, so a crash at any moment loses no
write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from vmreplica._internal import faults
from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu import nbd_copy, qemu_img, tracking
from vmreplica._internal.drivers.qemu.qsd import node_name, start_storage_daemon
from vmreplica._internal.engine import repl_store as rs
from vmreplica._internal.engine.connect import peer_address
from vmreplica._internal.engine.events import EventLog, now_iso
from vmreplica._internal.engine.health import after_cycle
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.store.db import Database
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import PeerClient
from vmreplica.errors import (
    IntegrityError,
    InvalidArgument,
    InvalidState,
    ResyncRequired,
    StorageError,
    VmrError,
)

log = logging.getLogger("vmreplica.primary")

RESYNC_PENDING_FRACTION = 0.5


class PrimaryEngine:
    def __init__(self, db: Database, events: EventLog, config: HostConfig, vms: VmService) -> None:
        self._db = db
        self._events = events
        self._config = config
        self._vms = vms
        self.store = rs.ReplicationStore(db)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._send_locks: dict[str, asyncio.Lock] = {}
        self._cycle_locks: dict[str, asyncio.Lock] = {}
        self._sizes: dict[str, int] = {}
        # This host's certificate listener port, if it listens: the replica needs it to check
        # for split brain and to reverse replication later.
        self.own_port: Callable[[], int | None] = lambda: None

    # -- files -----------------------------------------------------------------------------

    def vm_dir(self, vm_id: str) -> Path:
        return self._config.state_dir / "replication" / vm_id

    def pending_dir(self, vm_id: str) -> Path:
        return self.vm_dir(vm_id) / "pending"

    def pending(self, vm_id: str) -> list[tuple[int, Path]]:
        root = self.pending_dir(vm_id)
        if not root.is_dir():
            return []
        return sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit())

    def pending_size(self, vm_id: str) -> int:
        return sum(f.stat().st_size for _, d in self.pending(vm_id) for f in d.glob("*.qcow2"))

    def _client(self, row: rs.ReplicationRow, timeout: float = 30.0) -> PeerClient:
        peer = peer_address(self._config, row.replica_server, row.replica_port)
        return PeerClient(peer, self._config.tls, timeout=timeout)

    def _nodes(self, row: rs.ReplicationRow) -> list[str]:
        return [node_name(i) for i in row.disks]

    @contextlib.asynccontextmanager
    async def target(self, rec: VmRecord) -> AsyncIterator[tracking.QmpTarget]:
        """The running VM's QEMU, or a storage daemon on the disks of a VM that is off."""
        process = self._vms.process(rec.id)
        if process is not None:
            yield process
            return
        run_dir = self._vms.run_dir(rec.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        daemon = await start_storage_daemon(rec.disks, run_dir, vm_name=rec.name)
        try:
            yield daemon
        finally:
            await daemon.stop()

    # -- enable ----------------------------------------------------------------------------

    async def enable(
        self, name: str, replica_server: str, replica_port: int, auth: str, settings: rs.Settings,
        exclude_disks: list[str],
    ) -> rs.ReplicationRow:  # fmt: skip
        if auth.lower() != "certificate":
            raise InvalidArgument(
                f"{auth} authentication is not available in this version of vmreplica: use --auth certificate"
            )
        rs.check_settings(settings)
        rec = self._vms.find(name)
        if self.store.find(rec.id) is not None:
            raise InvalidState(f"replication is already enabled for VM {name}")
        excluded = {str(Path(p).absolute()) for p in exclude_disks}
        unknown = excluded - {str(d) for d in rec.disks}
        if unknown:
            raise InvalidArgument(f"--exclude-disk {sorted(unknown)[0]}: not a disk of VM {name}")
        disks = tuple(i for i, d in enumerate(rec.disks) if str(d) not in excluded)
        if not disks:
            raise InvalidArgument(f"VM {name} would have no disk left to replicate")
        sizes = [await qemu_img.virtual_size(rec.disks[i], force_share=True) for i in disks]
        peer = peer_address(self._config, replica_server, replica_port)
        row = rs.ReplicationRow(
            vm_id=rec.id, vm_name=name, mode=rs.PRIMARY, state=rs.READY_FOR_INITIAL,
            primary_server=self._config.name, replica_server=peer.fqdn, replica_port=peer.port,
            authentication_type="certificate", settings=settings, disks=disks, trust_group=None,
            auth_entry=None, storage_dir=None, sequence=0, acked_sequence=0, generation=0,
            last_replication_time=None, last_replication_size=None, initial_progress=None,
            initial_size=None, enabled_time=now_iso(), stats_since=now_iso(), last_error=None,
            send_failure=None, last_rp_time=None, next_rp_id=1,
        )  # fmt: skip
        boot = {
            kind: Path(path)
            for kind, path in (("kernel", rec.kernel), ("initrd", rec.initrd))
            if path is not None
        }
        digests = {kind: await asyncio.to_thread(_digest, path) for kind, path in boot.items()}
        request = p.EnableRequest(
            vm_id=rec.id, vm_name=name, cpus=rec.cpus, memory_mb=rec.memory_mb,
            disk_sizes=tuple(sizes), settings=p.SettingsBody(**_settings_json(settings)),
            replica_port=peer.port, primary_port=self.own_port(), append=rec.append,
            kernel=digests.get("kernel"), initrd=digests.get("initrd"),
        )  # fmt: skip
        async with self._client(row) as client:
            await client.call(p.HELLO)
            answer = await client.call(p.ENABLE, request.to_json())
            for kind, path in boot.items():  # the replica boots its own copy after a failover
                await client.call(
                    f"{p.BOOT_FILE}?vm_id={rec.id}&kind={kind}",
                    data=_file_chunks(path),
                    headers={"Content-Type": "application/octet-stream"},
                )
        with self._db.tx() as conn:
            self.store.insert(conn, row)
            self._events.record(
                "replication-enabled",
                f"replication of {name} to {peer.fqdn}:{peer.port} enabled (replica storage "
                f"{answer.get('storage_dir')})",
                name,
                conn=conn,
            )
        return self.store.get(rec.id, name)

    async def set(self, name: str, changes: dict[str, Any]) -> rs.ReplicationRow:
        rec = self._vms.find(name)
        row = self.store.get(rec.id, name)
        current = _settings_json(row.settings)
        current.update({k: v for k, v in changes.items() if v is not None})
        settings = rs.check_settings(rs.Settings(**current))
        self.store.update(rec.id, settings=settings)
        self._events.record("replication-changed", f"replication settings of {name} changed", name)
        self._kick(rec.id)
        return self.store.get(rec.id, name)

    # -- initial replication ---------------------------------------------------------------

    async def start_initial(self, name: str) -> rs.ReplicationRow:
        rec = self._vms.find(name)
        row = self.store.get(rec.id, name)
        if row.mode != rs.PRIMARY:
            raise InvalidState(
                f"VM {name} is a replica here: start initial replication on its primary server"
            )
        if row.state == rs.INITIAL_IN_PROGRESS:
            # A copy that failed waits for the schedule to retry it: start it again now.
            self.store.update(rec.id, send_failure=None, last_error=None)
            self._spawn(rec.id)
            self._kick(rec.id)
            return self.store.get(rec.id, name)
        if row.state != rs.READY_FOR_INITIAL:
            raise InvalidState(f"initial replication of {name} cannot start in state {row.state}")
        self.store.update(
            rec.id, state=rs.INITIAL_IN_PROGRESS, initial_progress=0.0, last_error=None
        )
        self._events.record(
            "initial-replication-started", f"initial replication of {name} started", name
        )
        self._spawn(rec.id)
        return self.store.get(rec.id, name)

    async def _initial(self, row: rs.ReplicationRow) -> None:
        """Copy every replicated disk to the replica and start tracking at the same instant.

        The data goes over NBD with TLS, straight from a point-in-time export of the disks into
        the replica's new base images (hypervisor/nbd_copy.py); the HTTPS calls only open and
        close the import. A copy that fails or is interrupted is started over.
        """
        started = datetime.now(UTC)
        async with self._client(row, timeout=120.0) as client:
            answer = await client.call(p.STATUS, p.StatusRequest(row.vm_id).to_json())
            if int(answer.get("sequence", 0)) >= 1:
                # The replica adopted the copy before a crash lost its acknowledgement here. The
                # bitmap of generation 1 was added when that copy began; settle() checks it.
                size = row.initial_size or 0
            else:
                size = await self._copy_initial(row, client)
        now = now_iso()
        with self._db.tx() as conn:
            self.store.update(
                row.vm_id, conn, state=rs.REPLICATING, sequence=1, generation=1, acked_sequence=1,
                initial_progress=100.0, initial_size=size, last_replication_time=now,
                last_replication_size=size, send_failure=None, last_error=None,
            )  # fmt: skip
            self.store.record_cycle(conn, row.vm_id, started.isoformat(), True, 1, size, 0)
            self._events.record(
                "initial-replication-done",
                f"initial replication of {row.vm_name} done ({size} bytes)",
                row.vm_name,
                conn=conn,
            )
        shutil.rmtree(self.pending_dir(row.vm_id), ignore_errors=True)

    async def _copy_initial(self, row: rs.ReplicationRow, client: PeerClient) -> int:
        rec = self._vms.find(row.vm_name)
        peer = peer_address(self._config, row.replica_server, row.replica_port)
        run_dir = self._vms.run_dir(rec.id) / "initial"
        tls_dir = nbd_copy.tls_creds_dir(run_dir / "tls", self._config.tls, "client")
        nodes, disks = self._nodes(row), [rec.disks[i] for i in row.disks]
        progress = self._initial_progress(row, [await _virtual_size(d) for d in disks])
        marks = [time.monotonic()]
        required = sum([await qemu_img.measure_required(d) for d in disks])
        # The replica prepares its images while tracking starts here.
        opening = asyncio.ensure_future(
            client.call(p.INITIAL_OPEN, p.InitialOpenRequest(row.vm_id, required).to_json())
        )
        closed = False
        try:
            async with self._vms.lock(rec.id):
                process = self._vms.process(rec.id)
                if process is None:
                    # Off, and kept off by the lock: qemu-img reads the images themselves.
                    await _start_tracking_offline(disks)
                    source = nbd_copy.file_source(disks)
                else:
                    await tracking.remove_all(process, nodes)
                    source = await nbd_copy.export_source(process, nodes, run_dir, tracking.name(1))
                try:
                    await faults.ahit("primary.before_initial_copy")
                    opened = await opening
                    marks.append(time.monotonic())
                    port, exports = int(opened["port"]), [str(e) for e in opened["exports"]]
                    if len(exports) != len(nodes):
                        raise InvalidState(
                            f"the replica offers {len(exports)} disks, {row.vm_name} has {len(nodes)}"
                        )
                    for disk, export in enumerate(exports):
                        await nbd_copy.convert(
                            source, disk, peer.address, port, export, tls_dir, peer.fqdn,
                            functools.partial(progress, disk),
                        )  # fmt: skip
                    marks.append(time.monotonic())
                finally:
                    if process is not None:
                        with contextlib.suppress(VmrError, TimeoutError):
                            await nbd_copy.close_source(process, source)
            faults.hit("primary.after_initial_copy")
            answer = await client.call(
                p.INITIAL_CLOSE, p.InitialCloseRequest(row.vm_id, ok=True).to_json()
            )
            closed = True
            marks.append(time.monotonic())
            prepare, copy, finish = (b - a for a, b in itertools.pairwise(marks))
            log.info(
                "initial copy of %s: prepare %.2f s, copy %.2f s, finish %.2f s",
                row.vm_name, prepare, copy, finish,
            )  # fmt: skip
            return int(answer.get("size", 0))
        finally:
            if not opening.done():
                opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            if not closed:
                # Even when the open was cut short here: the replica may have finished it, and
                # its lock on the VM puts this close after the open.
                with contextlib.suppress(VmrError):
                    await client.call(
                        p.INITIAL_CLOSE, p.InitialCloseRequest(row.vm_id, ok=False).to_json()
                    )
            shutil.rmtree(run_dir, ignore_errors=True)

    def _initial_progress(
        self, row: rs.ReplicationRow, sizes: list[int]
    ) -> Callable[[int, float], None]:
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
                self.store.update(row.vm_id, initial_progress=round(min(total, 99.0), 1))

        return progress

    # -- cycles ----------------------------------------------------------------------------

    def _spawn(self, vm_id: str) -> None:
        task = self._tasks.get(vm_id)
        if task is None or task.done():
            self._wake[vm_id] = asyncio.Event()
            self._tasks[vm_id] = asyncio.create_task(
                self._loop(vm_id), name=f"replicate-{vm_id[:8]}"
            )

    def _kick(self, vm_id: str) -> None:
        event = self._wake.get(vm_id)
        if event is not None:
            event.set()

    async def _loop(self, vm_id: str) -> None:
        """One VM's scheduler: a cycle every ``frequency_sec`` on a fixed grid. Periods that pass
        while a cycle is still busy are missed, and are counted with the next cycle."""
        due = datetime.now(UTC)
        missed = 0
        while True:
            row = self.store.find(vm_id)
            if row is None or row.mode != rs.PRIMARY:
                return
            started = datetime.now(UTC)
            try:
                if row.state == rs.INITIAL_IN_PROGRESS:
                    await self._initial(row)
                elif row.state == rs.REPLICATING:
                    await self.cycle(row.vm_id, started, missed)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(row, started, e, missed)
            finished = datetime.now(UTC)
            due, missed = after_cycle(due, finished, row.settings.frequency_sec)
            if row.state != rs.REPLICATING:
                missed = 0
            wake = self._wake.setdefault(vm_id, asyncio.Event())
            try:
                await asyncio.wait_for(
                    wake.wait(), max(0.0, (due - datetime.now(UTC)).total_seconds())
                )
                due = datetime.now(UTC)  # woken early (resume, settings): a new grid from now
            except TimeoutError:
                pass
            wake.clear()

    def _failed(
        self, row: rs.ReplicationRow, started: datetime, err: BaseException, missed: int
    ) -> None:
        message = err.message if isinstance(err, VmrError) else f"internal error: {err!r}"
        if not isinstance(err, VmrError):
            log.exception("replication cycle of %s failed", row.vm_name)
        fields: dict[str, Any] = {"last_error": message}
        if isinstance(err, ResyncRequired):
            fields["state"] = rs.WAITING_FOR_RESYNC
        elif isinstance(err, IntegrityError | InvalidState) and row.state == rs.INITIAL_IN_PROGRESS:
            fields["state"] = rs.ERROR
        else:
            # Whatever else failed (the network, storage, a replica that refuses), the changes
            # did not get there: the primary cannot send, which is Critical.
            fields["send_failure"] = message
        with self._db.tx() as conn:
            self.store.update(row.vm_id, conn, **fields)
            self.store.record_cycle(
                conn, row.vm_id, started.isoformat(), False, missed=missed, error=message
            )
            self._events.record(
                "replication-cycle-failed",
                f"replication of {row.vm_name} failed: {message}",
                row.vm_name,
                "error",
                conn=conn,
            )

    async def cycle(self, vm_id: str, started: datetime, missed: int = 0) -> None:
        """Cut a delta of everything written since the last one, queue it, send the queue."""
        async with self._cycle_lock(vm_id):
            row = self.store.get(vm_id, vm_id)
            rec = self._vms.find(row.vm_name)
            sequence = row.sequence + 1
            delta_dir = self.pending_dir(row.vm_id) / str(sequence)
            shutil.rmtree(delta_dir, ignore_errors=True)
            delta_dir.mkdir(parents=True)
            committed = False
            try:
                async with self._vms.lock(rec.id), self.target(rec) as target:
                    nodes = self._nodes(row)
                    await tracking.settle(target, nodes, row.generation)
                    await tracking.rotate(
                        target, nodes, row.generation, _delta_files(delta_dir, row)
                    )
                    await wire.build_manifest(
                        delta_dir, row.vm_id, sequence, "CrashConsistent", _compression(row)
                    )
                    faults.hit("primary.after_cut")
                    # The commit point: the delta is durable in the log, the generation moves on.
                    self.store.update(row.vm_id, sequence=sequence, generation=row.generation + 1)
                    committed = True
                    faults.hit("primary.after_commit")
                    await tracking.drop(target, nodes, row.generation)
            except BaseException:
                if not committed:
                    shutil.rmtree(delta_dir, ignore_errors=True)
                raise
        row = self.store.get(row.vm_id, row.vm_name)
        total = await self._virtual_size(rec)
        if self.pending_size(row.vm_id) > RESYNC_PENDING_FRACTION * total:
            raise ResyncRequired(
                f"the pending log of {row.vm_name} exceeds half of its disk size: a resynchronization is required"
            )
        await self._send_pending(row, started, missed)

    def _cycle_lock(self, vm_id: str) -> asyncio.Lock:
        return self._cycle_locks.setdefault(vm_id, asyncio.Lock())

    async def _virtual_size(self, rec: VmRecord) -> int:
        if rec.id not in self._sizes:
            self._sizes[rec.id] = sum(
                [await qemu_img.virtual_size(d, force_share=True) for d in rec.disks]
            )
        return self._sizes[rec.id]

    async def sync(self, name: str) -> rs.ReplicationRow:
        """Replicate now, outside the schedule, and return once the replica has it all."""
        rec = self._vms.find(name)
        row = self.store.get(rec.id, name)
        if row.mode != rs.PRIMARY or row.state != rs.REPLICATING:
            raise InvalidState(
                f"replication of {name} is not running here (state {row.state}, mode {row.mode})"
            )
        started = datetime.now(UTC)
        try:
            await self.cycle(rec.id, started)
        except VmrError as e:
            self._failed(self.store.get(rec.id, name), started, e, 0)
            raise
        return self.store.get(rec.id, name)

    async def _send_pending(
        self, row: rs.ReplicationRow, started: datetime, missed: int = 0
    ) -> None:
        lock = self._send_locks.setdefault(row.vm_id, asyncio.Lock())
        async with lock, self._client(row, timeout=60.0) as client:
            status = await client.call(
                p.STATUS,
                p.StatusRequest(
                    row.vm_id, p.SettingsBody(**_settings_json(row.settings))
                ).to_json(),
            )
            replica_sequence = int(status.get("sequence", 0))
            for sequence, delta_dir in self.pending(row.vm_id):
                if sequence <= replica_sequence:
                    shutil.rmtree(delta_dir, ignore_errors=True)
                    continue
                if not (delta_dir / "manifest.json").exists():
                    continue
                manifest = wire.DeltaManifest.from_json((delta_dir / "manifest.json").read_bytes())
                faults.hit("primary.before_send")
                await client.call(
                    f"{p.DELTA}?vm_id={row.vm_id}",
                    data=wire.iter_stream(delta_dir, manifest),
                    headers={"Content-Type": "application/octet-stream"},
                )
                size = sum(d.file_size for d in manifest.disks)
                now = now_iso()
                with self._db.tx() as conn:
                    fields: dict[str, Any] = {
                        "acked_sequence": sequence, "last_replication_time": now, "last_replication_size": size,
                        "send_failure": None, "last_error": None,
                    }  # fmt: skip
                    self.store.update(row.vm_id, conn, **fields)
                    self.store.record_cycle(
                        conn, row.vm_id, started.isoformat(), True, sequence, size, missed
                    )
                    missed = 0
                shutil.rmtree(delta_dir, ignore_errors=True)

    # -- control ---------------------------------------------------------------------------

    def resume_schedule(self, vm_id: str) -> None:
        self._spawn(vm_id)

    async def stop_schedule(self, vm_id: str) -> None:
        task = self._tasks.pop(vm_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def sync_pending(self, name: str) -> None:
        """Send what the pending log holds, now (after a reverse: the failback delta)."""
        rec = self._vms.find(name)
        started = datetime.now(UTC)
        try:
            await self._send_pending(self.store.get(rec.id, name), started)
        except VmrError as e:
            self._failed(self.store.get(rec.id, name), started, e, 0)
            raise

    async def suspend(self, name: str) -> rs.ReplicationRow:
        rec = self._vms.find(name)
        row = self.store.get(rec.id, name)
        new = {rs.REPLICATING: rs.SUSPENDED, rs.RESYNCHRONIZING: rs.RESYNC_SUSPENDED}.get(row.state)
        if new is None:
            raise InvalidState(f"replication of {name} cannot be suspended in state {row.state}")
        self.store.update(rec.id, state=new)
        self._events.record("replication-suspended", f"replication of {name} suspended", name)
        return self.store.get(rec.id, name)

    async def resume(self, name: str) -> rs.ReplicationRow:
        rec = self._vms.find(name)
        row = self.store.get(rec.id, name)
        if row.state in (rs.SUSPENDED, rs.ERROR):
            new = (
                rs.REPLICATING
                if row.sequence > 0 and row.acked_sequence > 0
                else rs.READY_FOR_INITIAL
            )
        elif row.state == rs.WAITING_FOR_RESYNC:
            raise ResyncRequired(
                f"replication of {name} needs a resynchronization, which this version cannot run yet"
            )
        else:
            raise InvalidState(f"replication of {name} is not suspended (state {row.state})")
        self.store.update(rec.id, state=new, last_error=None, send_failure=None)
        self._events.record("replication-resumed", f"replication of {name} resumed", name)
        self._spawn(rec.id)
        self._kick(rec.id)
        return self.store.get(rec.id, name)

    async def reset_statistics(self, vm_id: str) -> None:
        with self._db.tx() as conn:
            conn.execute("DELETE FROM cycles WHERE vm_id=?", (vm_id,))
            self.store.update(vm_id, conn, stats_since=now_iso())

    async def remove(self, row: rs.ReplicationRow) -> None:
        task = self._tasks.pop(row.vm_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        rec = self._vms.find(row.vm_name)
        async with self._vms.lock(rec.id), self.target(rec) as target:
            await tracking.remove_all(target, self._nodes(row))
        shutil.rmtree(self.vm_dir(row.vm_id), ignore_errors=True)
        with self._db.tx() as conn:
            self.store.delete(conn, row.vm_id)
            self._events.record(
                "replication-removed",
                f"replication of {row.vm_name} removed; change tracking dropped",
                row.vm_name,
                conn=conn,
            )

    # -- life cycle ------------------------------------------------------------------------

    def on_vm_off(self, rec: VmRecord, clean: bool) -> None:
        """A QEMU that died without closing its images leaves every bitmap inconsistent."""
        row = self.store.find(rec.id)
        if row is None or row.mode != rs.PRIMARY or clean:
            return
        if row.state in (rs.REPLICATING, rs.SUSPENDED, rs.INITIAL_IN_PROGRESS):
            self.store.update(rec.id, state=rs.WAITING_FOR_RESYNC,
                              last_error="the VM's QEMU process died, so change tracking is lost")  # fmt: skip
            self._events.record(
                "resync-required",
                f"change tracking of {rec.name} was lost (its QEMU process died): a resynchronization is required",
                rec.name,
                "error",
            )

    async def start(self) -> None:
        for row in self.store.all():
            if row.mode == rs.PRIMARY and row.state in (rs.INITIAL_IN_PROGRESS, rs.REPLICATING):
                self._spawn(row.vm_id)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


async def _virtual_size(disk: Path) -> int:
    return await qemu_img.virtual_size(disk, force_share=True)


async def _start_tracking_offline(disks: list[Path]) -> None:
    """Generation 1 of tracking on images nothing has open; older generations go."""
    for disk in disks:
        for bitmap in await qemu_img.bitmaps(disk):
            if bitmap.name.startswith(tracking.PREFIX):
                await qemu_img.bitmap_remove(disk, bitmap.name)
        await qemu_img.bitmap_add(disk, tracking.name(1))


def _digest(path: Path) -> p.BootFileInfo:
    try:
        size = path.stat().st_size
        digest = blake3.blake3().update_mmap(str(path)).hexdigest()
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
    return p.BootFileInfo(size, digest)


async def _file_chunks(path: Path, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while data := await asyncio.to_thread(f.read, chunk):
            yield data


def _settings_json(s: rs.Settings) -> dict[str, Any]:
    return {
        "frequency_sec": s.frequency_sec, "recovery_history": s.recovery_history,
        "snapshot_frequency_hour": s.snapshot_frequency_hour, "compression": s.compression,
        "auto_resynchronize": s.auto_resynchronize, "recovery_point_interval": s.recovery_point_interval,
    }  # fmt: skip


def _compression(row: rs.ReplicationRow) -> str:
    return "zstd" if row.settings.compression else "none"


def _delta_files(delta_dir: Path, row: rs.ReplicationRow) -> list[Path]:
    return [delta_dir / f"disk{n}.qcow2" for n in range(len(row.disks))]
