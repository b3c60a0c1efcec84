"""The replica side of replication: placeholder VMs, receiving and applying deltas into each
disk's chain, recovery points, and recovery of what a crash or a failed step interrupted.

A delta is refused before a byte is stored when the sender is not the server that created the
replica VM and not in its trust group, or when its sequence number is not exactly the next one;
once staged, it is refused (and removed) unless every disk of the VM is in it as a standalone
qcow2 of the disk's size. Only then is it journaled (``journal`` rows of kind
``apply``/``freeze``/``prune``), and the journal is replayed by one routine, :meth:`_replay`,
both at start-up and right after a journaled step failed in a running agent. A relationship
whose replay fails is quarantined: it refuses deltas and shows Critical with the reason until
``replication resume`` on this host retries it; the agent and every other VM carry on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import AsyncIterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from vmreplica._internal import faults
from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu import nbd_copy, qemu_img
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon, node_name, start_storage_daemon
from vmreplica._internal.engine import repl_store as rs
from vmreplica._internal.engine import validate
from vmreplica._internal.engine.events import EventLog, now_iso
from vmreplica._internal.engine.server import Authorization, warn_if_shared
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.models import RecoveryPoint
from vmreplica._internal.store.db import Database
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import protocol as p
from vmreplica.errors import (
    AccessDenied,
    IntegrityError,
    InvalidArgument,
    InvalidState,
    NotFound,
    ResyncRequired,
    StorageError,
    VmrError,
)

log = logging.getLogger("vmreplica.replica")

BOOT_DIR = "boot"  # in the replica VM's storage: the kernel and initrd copied from the primary


class ReplicaEngine:
    def __init__(self, db: Database, events: EventLog, config: HostConfig, vms: VmService) -> None:
        self._db = db
        self._events = events
        self._config = config
        self._vms = vms
        self.store = rs.ReplicationStore(db)
        self._locks: dict[str, asyncio.Lock] = {}
        # Open initial-copy imports: the daemon serving the new images, and when it started.
        self._imports: dict[str, tuple[StorageDaemon, str]] = {}

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def chains(self, row: rs.ReplicationRow) -> list[ReplicaChain]:
        assert row.storage_dir is not None
        return [ReplicaChain(Path(row.storage_dir) / f"disk{i}") for i in range(len(row.disks))]

    def _replica_row(self, vm_id: str) -> rs.ReplicationRow:
        row = self.store.find(vm_id)
        if row is None or row.mode != rs.REPLICA:
            raise NotFound(f"no replica VM with id {vm_id} on {self._config.name}")
        return row

    def _check_sender(
        self, row: rs.ReplicationRow, authz: Authorization, peer_names: list[str]
    ) -> None:
        """Only the creating server, or a server of the same trust group, may write this replica."""
        if row.primary_server in peer_names or authz.trust_group == row.trust_group:
            return
        err = AccessDenied(
            f"not authorized: {peer_names[0] if peer_names else 'this peer'} is in trust group "
            f"{authz.trust_group}, but replica VM {row.vm_name} belongs to trust group {row.trust_group}"
        )
        self._events.record(
            "delta-refused",
            f"refused a request for {row.vm_name}: {err.message}",
            row.vm_name,
            "warning",
        )
        raise err

    def _check_not_quarantined(self, row: rs.ReplicationRow) -> None:
        if row.quarantine is not None:
            raise InvalidState(
                f"replica VM {row.vm_name} on {self._config.name} takes no changes: "
                f"{row.quarantine}; fix the cause, then run `vmreplica replication resume "
                f"{row.vm_name}` on {self._config.name}"
            )

    # -- enable ----------------------------------------------------------------------------

    async def enable(
        self, authz: Authorization, peer_names: list[str], req: p.EnableRequest
    ) -> dict[str, Any]:
        name = validate.vm_name(req.vm_name)
        settings = rs.check_settings(rs.Settings(**req.settings.to_json()))
        existing = self.store.find(req.vm_id)
        if existing is not None:
            if existing.mode == rs.REPLICA and existing.primary_server in peer_names:
                return {"storage_dir": existing.storage_dir, "already": True}
            raise InvalidState(
                f"VM {name} ({req.vm_id}) already has a replication relationship on {self._config.name}"
            )
        if self._db.query_one("SELECT 1 FROM vms WHERE name=? OR id=?", (name, req.vm_id)):
            raise InvalidState(
                f"a VM named {name} already exists on replica server {self._config.name}"
            )
        storage = validate.child_path(authz.storage_location, name)
        if storage.exists():
            raise InvalidState(
                f"replica storage {storage} already exists on {self._config.name}, left by an "
                f"earlier replica of {name}: remove that VM with its storage there (`vmreplica vm "
                f"remove {name} --delete-storage`), or delete the directory if the VM is gone"
            )
        boot = {k: v for k, v in (("kernel", req.kernel), ("initrd", req.initrd)) if v}
        boot_dir = storage / BOOT_DIR
        try:
            for i, size in enumerate(req.disk_sizes):
                await ReplicaChain.create(storage / f"disk{i}", size)
            if boot:
                boot_dir.mkdir(mode=0o700)
            with self._db.tx() as conn:
                self._vms.register(
                    conn, req.vm_id, name, req.cpus, req.memory_mb, storage,
                    [storage / f"disk{i}" / "tip.qcow2" for i in range(len(req.disk_sizes))],
                    str(boot_dir / "kernel") if req.kernel else None,
                    str(boot_dir / "initrd") if req.initrd else None, req.append,
                )  # fmt: skip
                self.store.insert(
                    conn,
                    rs.ReplicationRow(
                        vm_id=req.vm_id, vm_name=name, mode=rs.REPLICA, state=rs.WAITING_FOR_INITIAL,
                        primary_server=peer_names[0], replica_server=self._config.name,
                        replica_port=req.replica_port, authentication_type="certificate",
                        settings=settings, disks=tuple(range(len(req.disk_sizes))), trust_group=authz.trust_group,
                        auth_entry=authz.entry, storage_dir=str(storage), sequence=0, acked_sequence=0,
                        generation=0, last_replication_time=None, last_replication_size=None,
                        initial_progress=None, initial_size=None, enabled_time=now_iso(),
                        stats_since=now_iso(), last_error=None, send_failure=None, last_rp_time=None,
                        next_rp_id=1, peer_port=req.primary_port,
                        boot_files=json.dumps({k: {"size": v.size, "blake3": v.blake3} for k, v in boot.items()}),
                    ),
                )  # fmt: skip
                self._events.record(
                    "replica-created",
                    f"replica VM {name} created for primary {peer_names[0]} (trust group "
                    f"{authz.trust_group}, storage {storage})",
                    name,
                    conn=conn,
                )
        except BaseException:
            shutil.rmtree(storage, ignore_errors=True)
            raise
        warn_if_shared(self._events, authz.storage_location)
        return {"storage_dir": str(storage), "already": False}

    async def receive_boot_file(
        self,
        authz: Authorization,
        peer_names: list[str],
        vm_id: str,
        kind: str,
        chunks: AsyncIterable[bytes],
    ) -> dict[str, Any]:
        """A copy of the kernel or initrd that ``enable`` announced, checked against its hash.

        The replica never boots a file named by a peer: it boots its own copy, from the
        replica VM's storage, and only one whose size and blake3 match the announcement.
        """
        row = self._replica_row(vm_id)
        self._check_sender(row, authz, peer_names)
        expected = json.loads(row.boot_files or "{}").get(kind)
        if expected is None:
            raise InvalidArgument(f"replication of {row.vm_name} announced no {kind}")
        size, digest = int(expected["size"]), str(expected["blake3"])
        target = Path(str(row.storage_dir)) / BOOT_DIR / kind
        if await asyncio.to_thread(_file_digest, target) == (size, digest):
            return {"size": size}  # a retried enable: this copy is already here
        if row.state != rs.WAITING_FOR_INITIAL:
            raise InvalidState(
                f"the {kind} of replica VM {row.vm_name} can only be sent before its initial copy"
            )
        part = target.with_name(kind + ".part")
        hasher, written = blake3.blake3(), 0
        try:
            with open(part, "wb") as f:
                async for chunk in chunks:
                    written += len(chunk)
                    if written > size:
                        raise IntegrityError(
                            f"the {kind} of {row.vm_name} is larger than announced"
                        )
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if written != size or hasher.hexdigest() != digest:
                raise IntegrityError(
                    f"the {kind} of {row.vm_name} does not match what enable announced "
                    "(corrupted in transit?)"
                )
            validate.boot_image(part, kind)
            os.replace(part, target)
            _fsync_dir(target.parent)
        except OSError as e:
            raise StorageError(
                f"cannot store the {kind} of {row.vm_name}: {e.strerror or e}"
            ) from e
        finally:
            part.unlink(missing_ok=True)
        return {"size": written}

    # -- status and settings ---------------------------------------------------------------

    async def status(
        self, authz: Authorization, peer_names: list[str], req: p.StatusRequest
    ) -> dict[str, Any]:
        row = self._replica_row(req.vm_id)
        self._check_sender(row, authz, peer_names)
        if req.settings is not None:
            settings = rs.check_settings(rs.Settings(**req.settings.to_json()))
            if settings != row.settings:
                self.store.update(row.vm_id, settings=settings)
        return {"sequence": row.sequence, "state": row.state}

    # -- initial copy ----------------------------------------------------------------------

    async def open_initial(
        self,
        authz: Authorization,
        peer_names: list[str],
        req: p.InitialOpenRequest,
        *,
        listen_host: str,
        peer_identity: str,
    ) -> dict[str, Any]:
        """Serve new, empty images for the sender's ``qemu-img convert`` (see nbd_copy).

        Whatever an earlier attempt left (its daemon, its images) is discarded first: an
        initial copy that did not finish is started over, never resumed.
        """
        row = self._replica_row(req.vm_id)
        self._check_sender(row, authz, peer_names)
        async with self.lock(row.vm_id):
            row = self._replica_row(row.vm_id)
            self._check_not_quarantined(row)
            if row.state != rs.WAITING_FOR_INITIAL or row.sequence != 0:
                raise InvalidState(
                    f"replica VM {row.vm_name} already has its initial copy (state {row.state})"
                )
            await self._close_import(row.vm_id)
            staging = self._initial_staging(row)
            _check_space(row, Path(str(row.storage_dir)), req.required_bytes)
            run_dir = self._vms.run_dir(row.vm_id) / "initial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            files = tuple(staging / f"disk{i}.qcow2" for i in range(len(row.disks)))
            try:
                staging.mkdir(parents=True)
                for chain, file in zip(self.chains(row), files, strict=True):
                    await qemu_img.create(file, await chain.virtual_size())
                direct = nbd_copy.supports_direct_io(staging)
                daemon = await start_storage_daemon(
                    files, run_dir, row.vm_name, direct=direct, env=nbd_copy.BULK_ENV
                )
            except OSError as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise StorageError(f"cannot prepare the initial copy of {row.vm_name}: {e}") from e
            self._imports[row.vm_id] = (daemon, now_iso())
            try:
                tls_dir = nbd_copy.tls_creds_dir(run_dir / "tls", self._config.tls, "server")
                nodes = [node_name(i) for i in range(len(files))]
                port, exports = await nbd_copy.serve_import(
                    daemon, nodes, tls_dir, peer_identity, listen_host,
                    self._config.initial_copy_ports,
                )  # fmt: skip
            except BaseException:
                await self._close_import(row.vm_id)
                raise
        log.info("initial copy of %s: serving %d images on port %d", row.vm_name, len(files), port)
        return {"port": port, "exports": list(exports)}

    async def close_initial(
        self, authz: Authorization, peer_names: list[str], req: p.InitialCloseRequest
    ) -> dict[str, Any]:
        """The sender's copy ended: adopt the images as the chains' base, or drop them."""
        row = self._replica_row(req.vm_id)
        self._check_sender(row, authz, peer_names)
        async with self.lock(row.vm_id):
            row = self._replica_row(row.vm_id)
            if not req.ok:
                await self._close_import(row.vm_id)
                return {"sequence": row.sequence}
            if row.sequence >= 1:  # a retried close: it was applied already
                return {"sequence": row.sequence, "size": row.initial_size or 0}
            opened = self._imports.pop(row.vm_id, None)
            if opened is None:
                raise InvalidState(
                    f"no initial copy of {row.vm_name} is open on {self._config.name} (did it "
                    "restart?): the copy starts over"
                )
            daemon, started = opened
            staging = self._initial_staging(row)
            try:
                await daemon.stop()  # closes the images: metadata written, flushed
            except BaseException:
                await daemon.kill()
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                size = await asyncio.to_thread(_sync_files, staging)
            except OSError as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise StorageError(f"cannot sync the initial copy of {row.vm_name}: {e}") from e
            self._journal_apply(row.vm_id, 1, staging, started, size=size)
            faults.hit("replica.after_stage")
            await self._apply_or_recover(row, 1, staging, started, size)
            return {"sequence": 1, "size": size}

    def _initial_staging(self, row: rs.ReplicationRow) -> Path:
        return Path(str(row.storage_dir)) / "staging" / "1"

    async def _close_import(self, vm_id: str) -> None:
        opened = self._imports.pop(vm_id, None)
        if opened is not None:
            await opened[0].kill()
        row = self.store.find(vm_id)
        if row is not None and row.storage_dir is not None and row.sequence == 0:
            shutil.rmtree(self._initial_staging(row), ignore_errors=True)

    async def close_all_imports(self) -> None:
        for vm_id in list(self._imports):
            await self._close_import(vm_id)

    # -- deltas ----------------------------------------------------------------------------

    async def receive(
        self, authz: Authorization, peer_names: list[str], vm_id: str, chunks: AsyncIterable[bytes]
    ) -> dict[str, Any]:
        row = self._replica_row(vm_id)
        self._check_sender(row, authz, peer_names)
        async with self.lock(vm_id):
            row = self._replica_row(vm_id)
            self._check_not_quarantined(row)
            if row.state in (rs.FAILED_OVER_WAITING, rs.FAILED_OVER):
                raise InvalidState(
                    f"replica VM {row.vm_name} has failed over: it accepts no more changes"
                )
            if row.state == rs.WAITING_FOR_INITIAL:
                raise InvalidState(
                    f"replica VM {row.vm_name} is waiting for its initial copy, not for a delta"
                )
            if self._journal_rows(vm_id):
                # A step an earlier request left unfinished: finish it before staging anew.
                await self._replay_or_quarantine(row.vm_id, "an unfinished step")
                row = self._replica_row(vm_id)
                self._check_not_quarantined(row)
            expected = row.sequence + 1
            disks = list(range(len(row.disks)))

            def check(manifest: wire.DeltaManifest) -> None:
                if manifest.sequence <= row.sequence:
                    raise IntegrityError(
                        f"delta {manifest.sequence} of VM {row.vm_name} was already applied: replayed delta refused"
                    )
                if manifest.sequence != expected:
                    raise ResyncRequired(
                        f"delta {manifest.sequence} of VM {row.vm_name} is out of sequence (expected "
                        f"{expected}): a resynchronization is required"
                    )
                if [d.index for d in manifest.disks] != disks:
                    raise IntegrityError(
                        f"delta {manifest.sequence} names disks {[d.index for d in manifest.disks]}, "
                        f"but replica VM {row.vm_name} has disks {disks}: every disk must be in it"
                    )

            staging = Path(str(row.storage_dir)) / "staging" / str(expected)
            shutil.rmtree(staging, ignore_errors=True)
            started = datetime.now(UTC)
            try:
                manifest = await wire.receive(
                    chunks, staging, expected_vm_id=vm_id, check_manifest=check
                )
                await self._check_staged(row, staging)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)  # a refused delta leaves nothing
                if isinstance(e, IntegrityError | ResyncRequired):
                    self._events.record(
                        "delta-refused",
                        f"refused a delta for {row.vm_name}: {e.message}",
                        row.vm_name,
                        "warning",
                    )
                raise
            self._journal_apply(
                vm_id, manifest.sequence, staging, started.isoformat(),
                created=manifest.created, consistency=manifest.consistency,
            )  # fmt: skip
            faults.hit("replica.after_stage")
            await self._apply_or_recover(row, manifest.sequence, staging, started.isoformat())
            return {"sequence": manifest.sequence}

    async def _check_staged(self, row: rs.ReplicationRow, staging: Path) -> None:
        for i, chain in enumerate(self.chains(row)):
            await chain.check_incoming(staging / f"disk{i}.qcow2")

    def _journal_apply(
        self, vm_id: str, sequence: int, staging: Path, started: str, **extra: Any
    ) -> None:
        data = {"sequence": sequence, "staging": str(staging), "started": started, **extra}
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO journal(kind, subject, step, data, created) VALUES('apply', ?, 'staged', ?, ?)",
                (vm_id, json.dumps(data), now_iso()),
            )

    async def _apply_or_recover(
        self, row: rs.ReplicationRow, sequence: int, staging: Path, started: str,
        size: int | None = None,
    ) -> None:  # fmt: skip
        """Apply a journaled delta; should that fail, finish it right here as a restart would,
        and quarantine the relationship only if that fails too (the error then goes back)."""
        try:
            await self._finish_apply(row, sequence, staging, started, size)
        except VmrError as e:
            log.warning(
                "applying delta %d of %s failed (%s): finishing it now", sequence, row.vm_name, e
            )
            await self._replay_or_quarantine(row.vm_id, f"applying delta {sequence} failed: {e}")
            if self._replica_row(row.vm_id).sequence < sequence:
                raise
        await self._recovery_point_or_recover(row.vm_id)

    async def _finish_apply(
        self,
        row: rs.ReplicationRow,
        sequence: int,
        staging: Path,
        started: str,
        size: int | None = None,
    ) -> None:
        """Apply a staged, verified delta; idempotent, so recovery simply calls it again.

        A journaled stage is whole: its files were checked before the journal row was written,
        and they disappear one by one only as each is committed into its chain. So a missing
        disk file means "applied", and the sequence, statistics and cycle are recorded once,
        by whichever run gets here first.
        """
        current = self._replica_row(row.vm_id)
        manifest_file = staging / wire.MANIFEST
        if size is None:
            size = 0
        if manifest_file.exists():
            size = sum(
                d.file_size for d in wire.DeltaManifest.from_json(manifest_file.read_bytes()).disks
            )
        initial = current.state == rs.WAITING_FOR_INITIAL
        for i, chain in enumerate(self.chains(current)):
            delta = staging / f"disk{i}.qcow2"
            if initial:
                # The first delta is a standalone full image and the chain is still empty: it
                # becomes the base as it is (the empty tip reads through it), instead of being
                # committed block by block into the tip.
                if delta.exists():
                    await _adopt_as_base(delta, chain)
            else:
                await chain.apply_delta(delta, missing_ok=True)
            faults.hit("replica.mid_apply")
        now = now_iso()
        with self._db.tx() as conn:
            if current.sequence < sequence:
                fields: dict[str, Any] = {
                    "sequence": sequence,
                    "last_replication_time": now,
                    "last_replication_size": size,
                    "state": rs.REPLICATING if initial else current.state,
                }
                if initial:
                    fields["last_rp_time"] = now
                    fields["initial_size"] = size
                    self._events.record(
                        "initial-replication-done",
                        f"initial replication of {row.vm_name} applied",
                        row.vm_name,
                        conn=conn,
                    )
                self.store.update(row.vm_id, conn, **fields)
                self.store.record_cycle(conn, row.vm_id, started, True, sequence, size)
            conn.execute(
                "DELETE FROM journal WHERE kind='apply' AND subject=? AND json_extract(data, "
                "'$.sequence')<=?",
                (row.vm_id, sequence),
            )
        shutil.rmtree(staging, ignore_errors=True)

    # -- recovery points -------------------------------------------------------------------

    async def _recovery_point_or_recover(self, vm_id: str) -> None:
        """After an apply: a point, if one is due. The delta is applied and acknowledged either
        way; a failed freeze or prune is finished right here, or quarantines the relationship."""
        try:
            await self._maybe_recovery_point(vm_id)
        except VmrError as e:
            log.warning("recovery point of %s failed (%s): finishing it now", vm_id, e)
            await self._replay_or_quarantine(vm_id, f"creating a recovery point failed: {e}")

    async def _maybe_recovery_point(self, vm_id: str) -> None:
        row = self._replica_row(vm_id)
        if row.settings.recovery_history == 0 or row.last_rp_time is None:
            return
        age = (datetime.now(UTC) - datetime.fromisoformat(row.last_rp_time)).total_seconds()
        if age < row.settings.recovery_point_interval:
            return
        await self.freeze(row, "Standard")
        await self.prune(vm_id)

    async def freeze(self, row: rs.ReplicationRow, kind: str) -> int:
        point = row.next_rp_id
        # The point holds tip as it is now: its time is now, even if a restart finishes it.
        data = {"point": point, "kind": kind, "time": now_iso()}
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO journal(kind, subject, step, data, created) VALUES('freeze', ?, 'start', ?, ?)",
                (row.vm_id, json.dumps(data), now_iso()),
            )
        faults.hit("replica.mid_freeze")
        await self._finish_freeze(row, point, kind, str(data["time"]))
        return point

    async def _finish_freeze(
        self, row: rs.ReplicationRow, point: int, kind: str, created: str
    ) -> None:
        for chain in self.chains(row):
            await chain.freeze_recovery_point(point)
        with self._db.tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO recovery_points(vm_id, id, creation_time, kind) VALUES(?,?,?,?)",
                (row.vm_id, point, created, kind),
            )
            self.store.update(row.vm_id, conn, next_rp_id=point + 1, last_rp_time=created)
            conn.execute("DELETE FROM journal WHERE kind='freeze' AND subject=?", (row.vm_id,))
            self._events.record(
                "recovery-point-created",
                f"recovery point {point} of {row.vm_name} created",
                row.vm_name,
                conn=conn,
            )

    async def prune(self, vm_id: str) -> None:
        row = self._replica_row(vm_id)
        pinned = row.pinned
        while True:
            ids = [
                r["id"]
                for r in self._db.query(
                    "SELECT id FROM recovery_points WHERE vm_id=? ORDER BY id", (vm_id,)
                )
            ]
            if len(ids) <= row.settings.recovery_history or pinned:
                return
            oldest = ids[0]
            with self._db.tx() as conn:
                conn.execute(
                    "INSERT INTO journal(kind, subject, step, data, created) VALUES('prune', ?, 'start', ?, ?)",
                    (vm_id, json.dumps({"point": oldest}), now_iso()),
                )
            await self._finish_prune(row, oldest)

    async def _finish_prune(self, row: rs.ReplicationRow, point: int) -> None:
        for chain in self.chains(row):
            await chain.recover()
            if point in chain.point_ids() and chain.point_ids()[0] == point:
                await chain.prune_oldest()
        with self._db.tx() as conn:
            conn.execute("DELETE FROM recovery_points WHERE vm_id=? AND id=?", (row.vm_id, point))
            conn.execute("DELETE FROM journal WHERE kind='prune' AND subject=?", (row.vm_id,))
            self._events.record(
                "recovery-point-merged",
                f"recovery point {point} of {row.vm_name} merged into the base",
                row.vm_name,
                conn=conn,
            )

    def recovery_points(self, vm: VmRecord) -> list[RecoveryPoint]:
        row = self.store.find(vm.id)
        if row is None or row.mode != rs.REPLICA:
            raise InvalidState(f"VM {vm.name} is not a replica VM: it has no recovery points")
        chains = self.chains(row)
        out: list[RecoveryPoint] = []
        for r in self._db.query(
            "SELECT * FROM recovery_points WHERE vm_id=? ORDER BY id", (vm.id,)
        ):
            size = sum(
                c.rp_path(r["id"]).stat().st_size for c in chains if c.rp_path(r["id"]).exists()
            )
            out.append(
                RecoveryPoint(
                    id=str(r["id"]),
                    vm_name=vm.name,
                    creation_time=r["creation_time"],
                    kind=r["kind"],
                    size=size,
                )
            )
        tip_size = sum(c.tip.stat().st_size for c in chains if c.tip.exists())
        out.append(RecoveryPoint(id="Latest", vm_name=vm.name, creation_time=row.last_replication_time or row.enabled_time,
                                 kind="Latest", size=tip_size))  # fmt: skip
        return out

    # -- recovery: at start-up, after a failed step, and on request ------------------------

    def _journal_rows(self, vm_id: str) -> list[Any]:
        return self._db.query(
            "SELECT * FROM journal WHERE kind IN ('apply','freeze','prune') AND subject=? "
            "ORDER BY id",
            (vm_id,),
        )

    async def _replay(self, vm_id: str) -> int:
        """Finish every journaled step of one replica VM, oldest first, and bring its chains to
        a clean state; the one routine for start-up, a failed step, and ``resume``. Returns how
        many steps it finished."""
        finished = 0
        for j in self._journal_rows(vm_id):
            row = self.store.find(vm_id)
            data = json.loads(j["data"])
            if row is None or row.storage_dir is None:
                with self._db.tx() as conn:
                    conn.execute("DELETE FROM journal WHERE id=?", (j["id"],))
                continue
            for chain in self.chains(row):
                await chain.recover(row.pinned)
            log.info("finishing an interrupted %s of %s", j["kind"], row.vm_name)
            if j["kind"] == "apply":
                await self._finish_apply(
                    row, int(data["sequence"]), Path(data["staging"]), str(data["started"]),
                    _opt_int(data.get("size")),
                )  # fmt: skip
            elif j["kind"] == "freeze":
                created = str(data.get("time") or j["created"])
                await self._finish_freeze(row, int(data["point"]), str(data["kind"]), created)
            else:
                await self._finish_prune(row, int(data["point"]))
            finished += 1
        row = self.store.find(vm_id)
        if row is not None and row.mode == rs.REPLICA and row.storage_dir is not None:
            for chain in self.chains(row):
                await chain.recover(row.pinned)
            if vm_id not in self._imports:  # nothing staged is needed any more
                shutil.rmtree(Path(row.storage_dir) / "staging", ignore_errors=True)
        return finished

    async def _replay_or_quarantine(self, vm_id: str, cause: str) -> bool:
        """Replay; on failure mark the relationship quarantined (Critical, refusing changes)."""
        try:
            finished = await self._replay(vm_id)
        except Exception as e:  # one relationship must never stop the others, or the agent
            reason = e.message if isinstance(e, VmrError) else f"internal error: {e!r}"
            if not isinstance(e, VmrError):
                log.exception("recovery of replica %s failed", vm_id)
            self._quarantine(vm_id, f"{cause}, and finishing it failed: {reason}")
            return False
        row = self.store.find(vm_id)
        if finished and row is not None:
            self._events.record(
                "recovered",
                f"finished {finished} interrupted step(s) of {row.vm_name} ({cause})",
                row.vm_name,
            )
        return True

    def _quarantine(self, vm_id: str, reason: str) -> None:
        row = self.store.find(vm_id)
        if row is None:
            return
        with self._db.tx() as conn:
            self.store.update(vm_id, conn, quarantine=reason)
            self._events.record(
                "replica-quarantined",
                f"replica VM {row.vm_name} takes no changes until its recovery succeeds: {reason}",
                row.vm_name,
                "error",
                conn=conn,
            )

    async def recover(self) -> None:
        """At start-up: finish what a crash interrupted, one relationship at a time; one that
        cannot be recovered is quarantined and the agent starts anyway."""
        subjects = [
            str(r["subject"])
            for r in self._db.query(
                "SELECT DISTINCT subject FROM journal WHERE kind IN ('apply','freeze','prune')"
            )
        ]
        replicas = [r.vm_id for r in self.store.all() if r.mode == rs.REPLICA and r.storage_dir]
        for vm_id in dict.fromkeys([*subjects, *replicas]):
            row = self.store.find(vm_id)
            if row is not None and row.quarantine is not None:
                # Tried again at every start: the cause may have been fixed meanwhile.
                log.info("retrying the recovery of quarantined replica %s", row.vm_name)
            recovered = await self._replay_or_quarantine(vm_id, "a restart")
            if recovered and row is not None and row.quarantine is not None:
                self._lift_quarantine(row)

    async def retry(self, vm: VmRecord) -> rs.ReplicationRow:
        """``replication resume`` on the replica: retry the recovery of a quarantined replica."""
        row = self._replica_row(vm.id)
        if row.quarantine is None:
            raise InvalidState(
                f"replication of {vm.name} runs on its primary server {row.primary_server}: "
                "resume it there (this host holds its replica, which is not quarantined)"
            )
        async with self.lock(vm.id):
            if not await self._replay_or_quarantine(vm.id, "an operator's resume"):
                raise InvalidState(
                    f"recovery of replica VM {vm.name} failed again: "
                    f"{self._replica_row(vm.id).quarantine}"
                )
            self._lift_quarantine(row)
        return self._replica_row(vm.id)

    def _lift_quarantine(self, row: rs.ReplicationRow) -> None:
        with self._db.tx() as conn:
            self.store.update(row.vm_id, conn, quarantine=None)
            self._events.record(
                "replica-recovered",
                f"replica VM {row.vm_name} recovered: it takes changes again",
                row.vm_name,
                conn=conn,
            )

    def start_guard(self, vm: VmRecord) -> None:
        row = self.store.find(vm.id)
        if (
            row is not None
            and row.mode == rs.REPLICA
            and row.state not in (rs.FAILED_OVER_WAITING, rs.FAILED_OVER)
        ):
            raise InvalidState(
                f"VM {vm.name} is a replica: it can only run after a failover (`vmreplica failover start {vm.name}`)"
            )

    async def remove(self, row: rs.ReplicationRow) -> None:
        """The replica VM stays, as an ordinary VM on its latest point."""
        async with self.lock(row.vm_id):
            await self._close_import(row.vm_id)
            with self._db.tx() as conn:
                self.store.delete(conn, row.vm_id)
                conn.execute("DELETE FROM journal WHERE subject=?", (row.vm_id,))
                self._events.record(
                    "replication-removed",
                    f"replication of {row.vm_name} removed; the VM stays on its latest point",
                    row.vm_name,
                    conn=conn,
                )


async def _adopt_as_base(delta: Path, chain: ReplicaChain) -> None:
    if chain.point_ids() or (await qemu_img.info(chain.tip)).get("actual-size", 0) > 1024 * 1024:
        # Not an empty chain after all: apply it the ordinary way.
        await chain.apply_delta(delta)
        return
    os.replace(delta, chain.base)
    _fsync_dir(chain.dir)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> tuple[int, str] | None:
    try:
        return path.stat().st_size, blake3.blake3().update_mmap(str(path)).hexdigest()
    except (OSError, ValueError):
        return None


def _check_space(row: rs.ReplicationRow, storage: Path, required: int) -> None:
    """Refuse a copy that cannot fit before it starts, rather than hours into it."""
    free = shutil.disk_usage(storage).free
    if required > free:
        raise StorageError(
            f"disk full: the initial copy of {row.vm_name} needs {required} bytes on the replica, "
            f"{free} are free in {storage}"
        )


def _sync_files(directory: Path) -> int:
    """fsync the images and their names; the space they take is the size of the copy."""
    size = 0
    for path in sorted(directory.glob("disk*.qcow2")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            size += os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
    _fsync_dir(directory)
    return size


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
