"""A replica VM's birth and end on this host: the placeholder VM and chains a primary's
``enable`` asks for, the copies of its kernel and initrd, the settings the primary keeps in
step with ``status``, and ``replication remove`` on this side."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterable
from pathlib import Path

import blake3

from vmreplica._internal import definition, validate
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica.common import (
    BOOT_DIR,
    REPLICA,
    chain_dir,
    check_sender,
    received_sequence,
    redirect_if_elsewhere,
    register_replica,
    replica_row,
    staging_dir,
)
from vmreplica._internal.engine.replica.initial import InitialImport
from vmreplica._internal.engine.replica.seed import Seeds
from vmreplica._internal.engine.server_settings import warn_if_shared
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.files import fsync_dir, write_atomic
from vmreplica._internal.ports.hypervisor import Definition
from vmreplica._internal.store.replications import KEPT, ReplicationRow, Settings
from vmreplica._internal.transport import answers, delta_resume
from vmreplica._internal.transport import protocol as p
from vmreplica.errors import IntegrityError, InvalidArgument, InvalidState, StorageError


class ReplicaLifecycle:
    def __init__(self, ctx: Context, vms: VmService, imports: InitialImport, seeds: Seeds) -> None:
        self._ctx = ctx
        self._vms = vms
        self._imports = imports
        self._seeds = seeds
        self._store = ctx.stores.replications

    async def enable(
        self, authz: Authorization, peer_names: list[str], req: p.EnableRequest
    ) -> answers.EnableAnswer:
        name = validate.vm_name(req.vm_name)
        settings = validate.replication_settings(Settings(**req.settings.to_json()))
        if req.definition is not None:
            definition.check(req.definition, req.vm_id, len(req.disk_sizes))
        existing = self._store.find(req.vm_id)
        if existing is not None:
            if existing.mode == REPLICA and existing.primary_server in peer_names:
                return answers.EnableAnswer(existing.storage_dir, already=True)
            raise InvalidState(
                f"VM {name} ({req.vm_id}) already has a replication relationship on {self._ctx.host}"
            )
        if (seed := self._seeds.seed_for(name)) is not None:
            async with self._ctx.locks.vm(seed[0].id):
                if (seed := self._seeds.seed_for(name)) is not None:
                    answer = await self._seeds.adopt(authz, peer_names, req, *seed, settings)
                    if answer.storage_dir:
                        _store_definition(Path(answer.storage_dir), req.definition)
                    return answer
        if self._ctx.stores.vms.exists(name=name, vm_id=req.vm_id):
            raise InvalidState(
                f"a VM named {name} already exists on replica server {self._ctx.host}"
            )
        storage = validate.child_path(authz.storage_location, name)
        if storage.exists():
            raise InvalidState(
                f"replica storage {storage} already exists on {self._ctx.host}, left by an "
                f"earlier replica of {name}: remove that VM with its storage there (`vmreplica vm "
                f"remove {name} --delete-storage`), or delete the directory if the VM is gone"
            )
        boot = {k: v for k, v in (("kernel", req.kernel), ("initrd", req.initrd)) if v}
        boot_dir = storage / BOOT_DIR
        if self._ctx.cluster is not None:
            # In a cluster the replica belongs to the node the primary reached (the initial
            # placement), which refuses if another node of the cluster owns that VM id.
            await self._ctx.cluster.adopt(req.vm_id, storage)
        try:
            tips = [
                (await self._ctx.driver.create_chain(chain_dir(storage, n), size)).tip
                for n, size in enumerate(req.disk_sizes)
            ]
            if boot:
                boot_dir.mkdir(mode=0o700)
            _store_definition(storage, req.definition)
            with self._ctx.stores.db.tx() as tx:
                register_replica(
                    self._ctx, self._vms, tx, authz, peer_names, req, name, settings, storage, tips
                )
                self._ctx.events.record(
                    "replica-created",
                    f"replica VM {name} created for primary {peer_names[0]} (trust group "
                    f"{authz.trust_group}, storage {storage})",
                    name,
                    tx=tx,
                )
        except BaseException:
            shutil.rmtree(storage, ignore_errors=True)
            raise
        warn_if_shared(self._ctx.events, authz.storage_location)
        return answers.EnableAnswer(str(storage), already=False)

    async def receive_boot_file(
        self, authz: Authorization, peer_names: list[str], vm_id: str, kind: str,
        chunks: AsyncIterable[bytes],
    ) -> dict[str, int]:  # fmt: skip
        """A copy of the kernel or initrd that ``enable`` announced, checked against its hash.

        The replica never boots a file named by a peer: it boots its own copy, from the
        replica VM's storage, and only one whose size and blake3 match the announcement.
        """
        await redirect_if_elsewhere(self._ctx, vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        expected = json.loads(row.boot_files or "{}").get(kind)
        if expected is None:
            raise InvalidArgument(f"replication of {row.vm_name} announced no {kind}")
        size, digest = int(expected["size"]), str(expected["blake3"])
        target = Path(str(row.storage_dir)) / BOOT_DIR / kind
        if await asyncio.to_thread(_file_digest, target) == (size, digest):
            return {"size": size}  # a retried enable: this copy is already here
        if row.state != State.WAITING_FOR_INITIAL:
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
            fsync_dir(target.parent)
        except OSError as e:
            raise StorageError(
                f"cannot store the {kind} of {row.vm_name}: {e.strerror or e}"
            ) from e
        finally:
            part.unlink(missing_ok=True)
        return {"size": written}

    async def status(
        self, authz: Authorization, peer_names: list[str], req: p.StatusRequest
    ) -> answers.StatusAnswer:
        await redirect_if_elsewhere(self._ctx, req.vm_id)
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        if req.settings is not None:
            settings = validate.replication_settings(Settings(**req.settings.to_json()))
            if settings != row.settings:
                self._store.update(row.vm_id, settings=settings)
        # While Resynchronizing, a delta is answered once journaled: the primary counts it in.
        sequence = received_sequence(self._ctx, row)
        kept = delta_resume.load(staging_dir(row, sequence + 1))
        resume = kept if kept is not None and kept.sequence == sequence + 1 else None
        kept_initial = (
            row.state == State.WAITING_FOR_INITIAL
            and row.sequence == 0
            and row.initial_kind == KEPT
        )
        return answers.StatusAnswer(sequence, row.state, resume, kept_initial)

    def definition_of(self, vm: VmRecord) -> Definition | None:
        """The primary's domain XML, kept beside the chains, for the failed-over VM (the
        replica VM itself) and its test VM ("NAME - Test"); None when the primary sent none."""
        row, test = self._store.find(vm.id), False
        if row is None:
            row = next((r for r in self._store.all() if r.test_vm_id == vm.id), None)
            test = True
        if row is None or not row.storage_dir:
            return None
        try:
            xml = (Path(row.storage_dir) / definition.FILE_NAME).read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StorageError(f"cannot read the domain XML of {row.vm_name}: {e}") from e
        return Definition(xml, test=test)

    def start_guard(self, vm: VmRecord) -> None:
        row = self._store.find(vm.id)
        if row is not None and row.mode == REPLICA and row.state not in (
            State.FAILED_OVER_WAITING, State.FAILED_OVER,
        ):  # fmt: skip
            raise InvalidState(
                f"VM {vm.name} is a replica: it can only run after a failover (`vmreplica "
                f"failover start {vm.name}`)"
            )

    async def remove(self, row: ReplicationRow) -> None:
        """The replica VM stays, as an ordinary VM on its latest point."""
        async with self._ctx.locks.replica(row.vm_id):
            await self._imports.close_import(row.vm_id)
            with self._ctx.stores.db.tx() as tx:
                self._store.delete(tx, row.vm_id)
                self._ctx.journal.end(tx, None, row.vm_id)
                self._ctx.events.record(
                    "replication-removed",
                    f"replication of {row.vm_name} removed; the VM stays on its latest point",
                    row.vm_name,
                    tx=tx,
                )


def _store_definition(storage: Path, xml: str | None) -> None:
    """The primary's domain XML beside the chains, written atomically (none: none kept)."""
    if xml is None:
        return
    try:
        write_atomic(storage / definition.FILE_NAME, xml.encode())
    except OSError as e:
        raise StorageError(f"cannot store the domain XML in {storage}: {e.strerror or e}") from e


def _file_digest(path: Path) -> tuple[int, str] | None:
    try:
        return path.stat().st_size, blake3.blake3().update_mmap(str(path)).hexdigest()
    except (OSError, ValueError):
        return None
