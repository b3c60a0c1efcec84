"""The replica side of replication: placeholder VMs, receiving and applying deltas into each
disk's chain, recovery points, and recovery of what a crash interrupted.

A delta is refused before a byte is stored when the sender is not the server that created the
replica VM and not in its trust group, or when its sequence number is not exactly the next one.
Applying is journaled (``journal`` rows of kind ``apply``/``freeze``/``prune``) in the same
transaction that records the staged delta, so :meth:`ReplicaEngine.recover` finishes it after a
kill -9; every step is idempotent.
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

from vmreplica._internal import faults
from vmreplica._internal.config import HostConfig
from vmreplica._internal.engine import repl_store as rs
from vmreplica._internal.engine import validate
from vmreplica._internal.engine.events import EventLog, now_iso
from vmreplica._internal.engine.server import Authorization
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.hypervisor import nbd_copy, qemu_img
from vmreplica._internal.hypervisor.qsd import StorageDaemon, node_name, start_storage_daemon
from vmreplica._internal.models import RecoveryPoint
from vmreplica._internal.store.chain import ReplicaChain
from vmreplica._internal.store.db import Database
from vmreplica._internal.transport import delta as wire
from vmreplica.errors import (
    AccessDenied,
    IntegrityError,
    InvalidState,
    NotFound,
    ResyncRequired,
    StorageError,
)

log = logging.getLogger("vmreplica.replica")


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

    # -- enable ----------------------------------------------------------------------------

    async def enable(
        self, authz: Authorization, peer_names: list[str], req: dict[str, Any]
    ) -> dict[str, Any]:
        vm_id, name = str(req["vm_id"]), validate.vm_name(str(req["vm_name"]))
        sizes = [int(s) for s in req["disk_sizes"]]
        existing = self.store.find(vm_id)
        if existing is not None:
            if existing.mode == rs.REPLICA and existing.primary_server in peer_names:
                return {"storage_dir": existing.storage_dir, "already": True}
            raise InvalidState(
                f"VM {name} ({vm_id}) already has a replication relationship on {self._config.name}"
            )
        if self._db.query_one("SELECT 1 FROM vms WHERE name=? OR id=?", (name, vm_id)):
            raise InvalidState(
                f"a VM named {name} already exists on replica server {self._config.name}"
            )
        storage = validate.child_path(authz.storage_location, name)
        if storage.exists():
            raise InvalidState(f"replica storage {storage} already exists on {self._config.name}")
        settings = rs.Settings(**req["settings"])
        try:
            for i, size in enumerate(sizes):
                await ReplicaChain.create(storage / f"disk{i}", size)
            with self._db.tx() as conn:
                self._vms.register(
                    conn, vm_id, name, int(req["cpus"]), int(req["memory_mb"]), storage,
                    [storage / f"disk{i}" / "tip.qcow2" for i in range(len(sizes))],
                    _existing_file(req.get("kernel")), _existing_file(req.get("initrd")), req.get("append"),
                )  # fmt: skip
                self.store.insert(
                    conn,
                    rs.ReplicationRow(
                        vm_id=vm_id, vm_name=name, mode=rs.REPLICA, state=rs.WAITING_FOR_INITIAL,
                        primary_server=peer_names[0], replica_server=self._config.name,
                        replica_port=int(req["replica_port"]), authentication_type="certificate",
                        settings=settings, disks=tuple(range(len(sizes))), trust_group=authz.trust_group,
                        auth_entry=authz.entry, storage_dir=str(storage), sequence=0, acked_sequence=0,
                        generation=0, last_replication_time=None, last_replication_size=None,
                        initial_progress=None, initial_size=None, enabled_time=now_iso(),
                        stats_since=now_iso(), last_error=None, send_failure=None, last_rp_time=None,
                        next_rp_id=1, peer_port=_opt_int(req.get("primary_port")),
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
        return {"storage_dir": str(storage), "already": False}

    # -- status and settings ---------------------------------------------------------------

    async def status(
        self, authz: Authorization, peer_names: list[str], req: dict[str, Any]
    ) -> dict[str, Any]:
        row = self._replica_row(str(req["vm_id"]))
        self._check_sender(row, authz, peer_names)
        if "settings" in req:
            settings = rs.Settings(**req["settings"])
            if settings != row.settings:
                self.store.update(row.vm_id, settings=settings)
        return {"sequence": row.sequence, "state": row.state}

    # -- initial copy ----------------------------------------------------------------------

    async def open_initial(
        self,
        authz: Authorization,
        peer_names: list[str],
        req: dict[str, Any],
        *,
        listen_host: str,
        peer_identity: str,
    ) -> dict[str, Any]:
        """Serve new, empty images for the sender's ``qemu-img convert`` (see nbd_copy).

        Whatever an earlier attempt left (its daemon, its images) is discarded first: an
        initial copy that did not finish is started over, never resumed.
        """
        row = self._replica_row(str(req["vm_id"]))
        self._check_sender(row, authz, peer_names)
        async with self.lock(row.vm_id):
            row = self._replica_row(row.vm_id)
            if row.state != rs.WAITING_FOR_INITIAL or row.sequence != 0:
                raise InvalidState(
                    f"replica VM {row.vm_name} already has its initial copy (state {row.state})"
                )
            await self._close_import(row.vm_id)
            staging = self._initial_staging(row)
            _check_space(row, Path(str(row.storage_dir)), _opt_int(req.get("required_bytes")) or 0)
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
        self, authz: Authorization, peer_names: list[str], req: dict[str, Any]
    ) -> dict[str, Any]:
        """The sender's copy ended: adopt the images as the chains' base, or drop them."""
        row = self._replica_row(str(req["vm_id"]))
        self._check_sender(row, authz, peer_names)
        async with self.lock(row.vm_id):
            row = self._replica_row(row.vm_id)
            if not req.get("ok"):
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
            with self._db.tx() as conn:
                conn.execute(
                    "INSERT INTO journal(kind, subject, step, data, created) VALUES('apply', ?, 'staged', ?, ?)",
                    (row.vm_id, json.dumps({"sequence": 1, "staging": str(staging), "size": size,
                                            "started": started}), now_iso()),
                )  # fmt: skip
            faults.hit("replica.after_stage")
            await self._finish_apply(row, 1, staging, started, size)
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
            if row.state in (rs.FAILED_OVER_WAITING, rs.FAILED_OVER):
                raise InvalidState(
                    f"replica VM {row.vm_name} has failed over: it accepts no more changes"
                )
            expected = row.sequence + 1

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
                if len(manifest.disks) != len(row.disks):
                    raise IntegrityError(
                        f"delta {manifest.sequence} has {len(manifest.disks)} disks, the replica has {len(row.disks)}"
                    )

            staging = Path(str(row.storage_dir)) / "staging" / str(expected)
            shutil.rmtree(staging, ignore_errors=True)
            started = datetime.now(UTC)
            try:
                manifest = await wire.receive(
                    chunks, staging, expected_vm_id=vm_id, check_manifest=check
                )
            except (IntegrityError, ResyncRequired) as e:
                self._events.record(
                    "delta-refused",
                    f"refused a delta for {row.vm_name}: {e.message}",
                    row.vm_name,
                    "warning",
                )
                raise
            with self._db.tx() as conn:
                conn.execute(
                    "INSERT INTO journal(kind, subject, step, data, created) VALUES('apply', ?, 'staged', ?, ?)",
                    (vm_id, json.dumps({"sequence": manifest.sequence, "staging": str(staging),
                                        "created": manifest.created, "started": started.isoformat(),
                                        "consistency": manifest.consistency}), now_iso()),
                )  # fmt: skip
            faults.hit("replica.after_stage")
            await self._finish_apply(row, manifest.sequence, staging, started.isoformat())
            return {"sequence": manifest.sequence}

    async def _finish_apply(
        self,
        row: rs.ReplicationRow,
        sequence: int,
        staging: Path,
        started: str,
        size: int | None = None,
    ) -> None:
        """Apply a staged, verified delta; idempotent, so recovery simply calls it again."""
        manifest_file = staging / "manifest.json"
        if size is None:
            size = 0
        if manifest_file.exists():
            size = sum(
                d.file_size for d in wire.DeltaManifest.from_json(manifest_file.read_bytes()).disks
            )
        initial = row.state == rs.WAITING_FOR_INITIAL
        for i, chain in enumerate(self.chains(row)):
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
            state = rs.REPLICATING if row.state == rs.WAITING_FOR_INITIAL else row.state
            fields: dict[str, Any] = {
                "sequence": sequence,
                "last_replication_time": now,
                "state": state,
            }
            if row.state == rs.WAITING_FOR_INITIAL:
                fields["last_rp_time"] = now
                fields["initial_size"] = size
                self._events.record(
                    "initial-replication-done",
                    f"initial replication of {row.vm_name} applied",
                    row.vm_name,
                    conn=conn,
                )
            self.store.update(row.vm_id, conn, last_replication_size=size, **fields)
            self.store.record_cycle(conn, row.vm_id, started, True, sequence, size)
            conn.execute("DELETE FROM journal WHERE kind='apply' AND subject=?", (row.vm_id,))
        shutil.rmtree(staging, ignore_errors=True)
        await self._maybe_recovery_point(row.vm_id)

    # -- recovery points -------------------------------------------------------------------

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
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO journal(kind, subject, step, data, created) VALUES('freeze', ?, 'start', ?, ?)",
                (row.vm_id, json.dumps({"point": point, "kind": kind}), now_iso()),
            )
        await self._finish_freeze(row, point, kind)
        return point

    async def _finish_freeze(self, row: rs.ReplicationRow, point: int, kind: str) -> None:
        for chain in self.chains(row):
            await chain.freeze_recovery_point(point)
        now = now_iso()
        with self._db.tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO recovery_points(vm_id, id, creation_time, kind) VALUES(?,?,?,?)",
                (row.vm_id, point, now, kind),
            )
            self.store.update(row.vm_id, conn, next_rp_id=point + 1, last_rp_time=now)
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

    # -- start-up --------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish what a crash interrupted: staged deltas, freezes, prunes; drop partial stages."""
        for j in self._db.query(
            "SELECT * FROM journal WHERE kind IN ('apply','freeze','prune') ORDER BY id"
        ):
            row = self.store.find(j["subject"])
            data = json.loads(j["data"])
            if row is None:
                with self._db.tx() as conn:
                    conn.execute("DELETE FROM journal WHERE id=?", (j["id"],))
                continue
            for chain in self.chains(row):
                await chain.recover(row.pinned)
            log.info("finishing interrupted %s of %s", j["kind"], row.vm_name)
            if j["kind"] == "apply":
                await self._finish_apply(
                    row,
                    int(data["sequence"]),
                    Path(data["staging"]),
                    str(data["started"]),
                    _opt_int(data.get("size")),
                )
            elif j["kind"] == "freeze":
                await self._finish_freeze(row, int(data["point"]), str(data["kind"]))
            else:
                await self._finish_prune(row, int(data["point"]))
            self._events.record(
                "recovered",
                f"finished an interrupted {j['kind']} of {row.vm_name} after a restart",
                row.vm_name,
            )
        for row in self.store.all():
            if row.mode != rs.REPLICA or row.storage_dir is None:
                continue
            for chain in self.chains(row):
                await chain.recover(row.pinned)
            shutil.rmtree(Path(row.storage_dir) / "staging", ignore_errors=True)

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
    fd = os.open(chain.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _existing_file(value: object) -> str | None:
    return str(value) if isinstance(value, str) and Path(value).is_file() else None
