"""Virtual machines of this host: their definitions, creation and removal.

Creation and removal touch files and the database, so the VM row carries the step it is in
(``Creating`` / ``Removing``); :meth:`VmService.recover_definitions` finishes or undoes a step
that a crash interrupted. Running them is :mod:`runtime`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from vmreplica._internal import validate
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.vms.formats import CHAIN_FORMAT, formats_of, record_missing_formats
from vmreplica._internal.engine.vms.runtime import VmRuntime
from vmreplica._internal.models import Vm
from vmreplica._internal.ports.hypervisor import Definition, VmSpec
from vmreplica._internal.store.db import Tx
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.vms import VmRecord
from vmreplica._internal.transport.delta import disk_file
from vmreplica._internal.transport.protocol import MAX_DISK_SIZE, MAX_DISKS
from vmreplica.errors import InvalidArgument, InvalidState, NotFound, VmrError

log = logging.getLogger("vmreplica.vms")

OFF = "Off"
RUNNING = "Running"
CREATING = "Creating"
REMOVING = "Removing"


@dataclasses.dataclass(frozen=True)
class DiskRequest:
    """One disk of ``vm new``: exactly one of the three ways is set."""

    size: str | None = None
    path: str | None = None
    parent: str | None = None


@dataclasses.dataclass(frozen=True)
class VmRequest:
    name: str
    memory: str = "256M"
    cpus: int = 1
    disks: tuple[DiskRequest, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None


# Returns (replication_state, replication_health, replication_mode) for a VM id; the
# replication engine installs it so that `vm get` shows replication columns.
ReplicationInfo = Callable[[str], tuple[str, str | None, str | None]]


class VmService:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._store = ctx.stores.vms
        self.runtime = VmRuntime(ctx, self)
        self.replication_info: ReplicationInfo = lambda _id: ("Disabled", None, None)
        # Hooks for the replication engine: a VM about to be removed, places a disk may not be.
        self.remove_guards: list[Callable[[VmRecord], None]] = []
        self.disk_guards: list[Callable[[Path], None]] = []
        # Directories a replica VM's own storage may be in, for `vm remove --delete-storage`.
        self.storage_roots: Callable[[], list[Path]] = lambda: []
        # A replica VM's primary's domain XML, which a driver with domains defines it from.
        self.definition_of: Callable[[VmRecord], Definition | None] = lambda _rec: None
        ctx.journal.register("delete-storage", self._recover_delete_storage)
        self._adopting = asyncio.Lock()  # two `vm list` at once must not take a domain twice

    @property
    def vms_dir(self) -> Path:
        return self._ctx.config.state_dir / "vms"

    def run_dir(self, vm_id: str) -> Path:
        # Short on purpose: a unix socket path must stay under 108 bytes. The id is a UUID.
        return self._ctx.config.state_dir / "run" / vm_id[:8]

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> list[VmRecord]:
        return self._store.all()

    def find(self, name: str) -> VmRecord:
        rec = self._store.by_name(name)
        if rec is None or rec.state in (CREATING, REMOVING):
            raise NotFound(f"no VM named {name!r} on {self._ctx.host}")
        return rec

    def by_id(self, vm_id: str) -> VmRecord | None:
        return self._store.by_id(vm_id)

    def to_model(self, rec: VmRecord) -> Vm:
        rstate, rhealth, rmode = self.replication_info(rec.id)
        return Vm(
            computer_name=self._ctx.host, name=rec.name, id=rec.id, state=rec.state,
            cpus=rec.cpus, memory_mb=rec.memory_mb, disks=[str(d) for d in rec.disks],
            replication_state=rstate, replication_health=rhealth, replication_mode=rmode,
        )  # fmt: skip

    def list(self) -> list[Vm]:
        return [self.to_model(r) for r in self.records() if r.state not in (CREATING, REMOVING)]

    def get(self, name: str) -> Vm:
        return self.to_model(self.find(name))

    def spec(self, rec: VmRecord) -> VmSpec:
        return VmSpec(
            id=rec.id, name=rec.name, cpus=rec.cpus, memory_mb=rec.memory_mb, disks=rec.disks,
            kernel=Path(rec.kernel) if rec.kernel else None,
            initrd=Path(rec.initrd) if rec.initrd else None, append=rec.append,
            accel=self._ctx.config.accel, run_dir=self.run_dir(rec.id),
            definition=self.definition_of(rec), formats=rec.formats,
        )  # fmt: skip

    # -- creating ----------------------------------------------------------------------------

    async def new(self, req: VmRequest, vm_id: str | None = None) -> Vm:
        name = validate.vm_name(req.name)
        if self._store.exists(name=name):
            raise InvalidState(f"a VM named {name!r} already exists on {self._ctx.host}")
        memory_mb = validate.size(req.memory) // (1024 * 1024)
        if memory_mb < 16:
            raise InvalidArgument(f"invalid memory size {req.memory!r}: at least 16M is needed")
        if memory_mb > (host_mb := validate.host_memory_mb()):
            raise InvalidArgument(
                f"invalid memory size {req.memory!r}: this host has {host_mb} MiB, so the VM "
                "could never start here"
            )
        if not 1 <= req.cpus <= 64:
            raise InvalidArgument(f"invalid CPU count {req.cpus}: expected 1 to 64")
        kernel, initrd = _boot_file(req.kernel, "kernel"), _boot_file(req.initrd, "initrd")
        if initrd and not kernel:
            raise InvalidArgument("--initrd needs --kernel")
        # Check every disk before creating anything, so that bad input changes nothing.
        if len(req.disks) > MAX_DISKS:
            raise InvalidArgument(f"a VM has at most {MAX_DISKS} disks, not {len(req.disks)}")
        plan: list[tuple[DiskRequest, int | None, Path | None]] = []
        formats: list[str] = []  # told here, once; recorded with the VM
        for disk in req.disks:
            if sum(v is not None for v in (disk.size, disk.path, disk.parent)) != 1:
                raise InvalidArgument(
                    "each disk is one of --disk SIZE, --disk-path PATH or --disk-parent PATH"
                )
            if disk.size is not None:
                if (bytes_ := validate.size(disk.size)) > MAX_DISK_SIZE:  # no replica holds it
                    raise InvalidArgument(
                        f"invalid disk size {disk.size!r}: at most {MAX_DISK_SIZE >> 50}P"
                    )
                plan.append((disk, bytes_, None))
                formats.append(CHAIN_FORMAT)
                continue
            image = Path(str(disk.path or disk.parent)).absolute()
            flag = "--disk-path" if disk.path else "--disk-parent"
            if not (image.is_file() or image.is_block_device()):
                raise NotFound(f"{flag} {image}: no such image")
            if disk.path is not None:
                self._check_disk_is_free(image, flag)
            else:  # a chain image as backing: the VM's lock on it would stop every apply
                for guard in self.disk_guards:
                    guard(image.resolve())
            await self._ctx.driver.check_image(image)
            plan.append((disk, None, image))
            formats.append(await self._ctx.driver.disk_format(image) if disk.path else CHAIN_FORMAT)
        vm_dir = validate.child_path(self.vms_dir, name)
        if vm_dir.exists():
            raise InvalidState(f"{vm_dir} already exists: remove it or choose another VM name")
        paths = [
            (existing, False) if disk.path is not None and existing is not None
            else (disk_file(vm_dir, i), True)
            for i, (disk, _size, existing) in enumerate(plan)
        ]  # fmt: skip
        rec = VmRecord(
            id=vm_id or str(uuid.uuid4()), name=name, cpus=req.cpus, memory_mb=memory_mb,
            kernel=kernel, initrd=initrd, append=req.append, state=CREATING, vm_dir=vm_dir,
            disks=tuple(p for p, _ in paths), owned=tuple(o for _, o in paths),
            formats=tuple(formats),
        )  # fmt: skip
        with self._ctx.stores.db.tx() as tx:
            self._store.insert(tx, rec)
        try:
            vm_dir.mkdir(parents=True)
            for (_disk, size, parent), (path, owned) in zip(plan, paths, strict=True):
                if owned and size is not None:
                    await self._ctx.driver.create_image(path, size)
                elif owned and parent is not None:
                    parent_size = await self._ctx.driver.virtual_size(parent)
                    await self._ctx.driver.create_image(path, parent_size, backing=parent)
        except BaseException:
            await self._discard(rec)
            raise
        with self._ctx.stores.db.tx() as tx:
            self._store.set_state(rec.id, OFF, tx)
            self._ctx.events.record("vm-created", f"created VM {name} ({rec.id})", name, tx=tx)
        return self.get(name)

    def register(
        self, tx: Tx, vm_id: str, name: str, cpus: int, memory_mb: int, vm_dir: Path,
        disks: Sequence[Path], kernel: str | None = None, initrd: str | None = None,
        append: str | None = None, formats: Sequence[str | None] | None = None,
    ) -> None:  # fmt: skip
        """Record a VM whose disks another part of the engine made (a replica VM), in ``tx``.
        ``formats``: the disks' (None: the chains' qcow2)."""
        if self._store.exists(name=name, vm_id=vm_id, tx=tx):
            raise InvalidState(
                f"a VM named {name!r} (or with id {vm_id}) already exists on {self._ctx.host}"
            )
        self._store.insert(
            tx,
            VmRecord(vm_id, name, cpus, memory_mb, kernel, initrd, append, OFF, vm_dir,
                     tuple(disks), (False,) * len(disks),
                     tuple(formats) if formats is not None else (CHAIN_FORMAT,) * len(disks)),
        )  # fmt: skip

    async def adopt_defined(self) -> None:
        """VMs the hypervisor defines that this agent does not know yet (libvirt domains made
        with virsh, virt-manager, Cockpit) become its VMs, their disks used in place; one that
        runs is attached. A name another VM of the agent has keeps that domain out."""
        async with self._adopting:
            await self._adopt_defined()

    async def _adopt_defined(self) -> None:
        try:
            found = await self._ctx.driver.defined_vms()
        except VmrError as e:
            log.warning("cannot list the hypervisor's VMs: %s", e)
            return
        for vm in found:
            spec = vm.spec
            if self._store.by_id(spec.id) is not None:
                continue
            if self._store.by_name(spec.name) is not None:
                log.warning("domain %s (%s): the agent has another VM of that name", spec.name,
                            spec.id)  # fmt: skip
                continue
            formats = [  # what its XML says; else told once, here
                f or await self._ctx.driver.disk_format(d)
                for d, f in zip(spec.disks, formats_of(spec), strict=True)
            ]
            with self._ctx.stores.db.tx() as tx:
                self.register(
                    tx, spec.id, spec.name, spec.cpus, spec.memory_mb, self.vms_dir / spec.name,
                    spec.disks, kernel=str(spec.kernel) if spec.kernel else None,
                    initrd=str(spec.initrd) if spec.initrd else None, append=spec.append,
                    formats=formats,
                )  # fmt: skip
                self._ctx.events.record(
                    "vm-adopted", f"took VM {spec.name} ({spec.id}) from the hypervisor",
                    spec.name, tx=tx,
                )  # fmt: skip
            if vm.running:
                rec = self.by_id(spec.id)
                assert rec is not None
                await self.runtime.reattach(rec)

    def set_disks(self, tx: Tx, vm_id: str, disks: Sequence[Path]) -> None:
        """Point a VM at other disk files (failover overlays, reversed chains: the chains'
        qcow2)."""
        self._store.set_disks(tx, vm_id, disks, (CHAIN_FORMAT,) * len(disks))

    async def unregister(self, vm_id: str) -> None:
        """Forget a VM whose files another part owns (a test-failover VM), stopping it first."""
        rec = self.by_id(vm_id)
        if rec is None:
            return
        async with self._ctx.locks.vm(vm_id):
            await self.runtime.stop_if_running(rec)
            await self._ctx.driver.forget(vm_id)
            with self._ctx.stores.db.tx() as tx:
                self._store.delete(tx, vm_id)
            shutil.rmtree(self.run_dir(vm_id), ignore_errors=True)

    def _check_disk_is_free(self, image: Path, what: str) -> None:
        """A disk used in place must be no other VM's disk, nor anything the agent keeps (its
        state directory, replica storage): two writers would corrupt it."""
        real = image.resolve()
        state = self._ctx.config.state_dir.resolve()
        if real == state or state in real.parents:
            raise InvalidArgument(f"{what} {image}: a file of the agent's state directory")
        for vm_id, path in self._store.all_disks():
            if path.resolve() == real:
                other = self.by_id(vm_id)
                raise InvalidArgument(
                    f"{what} {image}: it is a disk of VM {other.name if other else vm_id}"
                )
        for guard in self.disk_guards:
            guard(real)

    # -- removing --------------------------------------------------------------------------

    async def _discard(self, rec: VmRecord) -> None:
        """Delete a VM's own files, then its row; safe to repeat after a crash."""
        await self._ctx.driver.forget(rec.id)
        for path, owned in zip(rec.disks, rec.owned, strict=True):
            if owned:
                path.unlink(missing_ok=True)
        if rec.vm_dir.is_dir() and rec.vm_dir.resolve().parent == self.vms_dir.resolve():
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir(rec.id), ignore_errors=True)
        for entry in self._ctx.journal.entries("delete-storage", subject=rec.id):
            shutil.rmtree(entry.data["path"], ignore_errors=True)
        with self._ctx.stores.db.tx() as tx:
            self._store.delete(tx, rec.id)
            self._ctx.journal.end(tx, "delete-storage", rec.id)

    async def _recover_delete_storage(self, entry: JournalEntry) -> None:
        rec = self.by_id(entry.subject)
        if rec is not None:
            await self._discard(rec)
        else:
            shutil.rmtree(entry.data["path"], ignore_errors=True)
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry.id)

    async def remove(self, name: str, force: bool = False, delete_storage: bool = False) -> Vm:
        """Remove a VM and the disks it created; ``delete_storage`` also deletes the replica
        storage a replica VM had (journaled, so a crash midway finishes the deletion)."""
        rec = self.find(name)
        async with self._ctx.locks.vm(rec.id):
            rec = self.find(name)
            for guard in self.remove_guards:
                guard(rec)
            storage = self._own_storage(rec) if delete_storage else None
            if rec.state == RUNNING:
                if not force:
                    raise InvalidState(f"VM {name} is running: stop it first, or use --force")
                await self.runtime.stop_if_running(rec)
            model = self.to_model(rec)
            with self._ctx.stores.db.tx() as tx:
                self._store.set_state(rec.id, REMOVING, tx)
                if storage is not None:
                    self._ctx.journal.begin(tx, "delete-storage", rec.id, {"path": str(storage)})
            await self._discard(rec)
            if self._ctx.cluster is not None:
                # Out of the cluster's registry; etcd down: a stale entry no node can take.
                with contextlib.suppress(VmrError):
                    await self._ctx.cluster.release(rec.id)
            what = f"removed VM {name}"
            if storage is not None:
                what += f" and its replica storage {storage}"
            self._ctx.events.record("vm-removed", what, vm_name=name)
            return model

    def _own_storage(self, rec: VmRecord) -> Path:
        """The directory of a (former) replica VM, only if it is one of a storage location's."""
        roots = [r.resolve() for r in self.storage_roots()]
        folder = rec.vm_dir.resolve()
        if folder.parent not in roots or folder.parent == self.vms_dir.resolve():
            raise InvalidArgument(
                f"VM {rec.name} has no replica storage of its own (its folder {rec.vm_dir} is not "
                "in a replica storage location): --delete-storage applies to replica VMs"
            )
        return folder

    async def recover_definitions(self) -> None:
        """Finish creations and removals a crash interrupted; record the disks' formats a
        database from before formats were recorded lacks."""
        for rec in self.records():
            if rec.state in (CREATING, REMOVING):
                log.info("finishing interrupted %s of VM %s", rec.state.lower(), rec.name)
                await self._discard(rec)
        await record_missing_formats(self._ctx, self._store, self.run_dir)


def _boot_file(value: str | None, kind: str) -> str | None:
    if value is None:
        return None
    path = Path(value).absolute()
    if not path.is_file():
        raise NotFound(f"--{kind} {path}: no such file")
    validate.boot_image(path, kind)
    return str(path)
