"""Virtual machines of this host: definitions in the state database, processes run by QEMU.

A VM's QEMU outlives the agent: on start-up the agent reattaches to every VM it left running and
records those whose process died meanwhile. Operations on one VM are serialized by a per-VM lock;
different VMs proceed in parallel.

Creation and removal touch files and the database, so the VM row carries the step it is in
(``Creating`` / ``Removing``); :meth:`VmService.recover` finishes or undoes a step that a crash
interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu import qemu, qemu_img
from vmreplica._internal.engine import validate
from vmreplica._internal.engine.events import EventLog, now_iso
from vmreplica._internal.models import Vm
from vmreplica._internal.store.db import Database
from vmreplica.errors import AccessDenied, InvalidArgument, InvalidState, NotFound, VmrError

log = logging.getLogger("vmreplica.vms")

OFF = "Off"
RUNNING = "Running"
CREATING = "Creating"
REMOVING = "Removing"

DEFAULT_STOP_TIMEOUT = 60.0
_HMP_INFO = re.compile(r"info(?: +[A-Za-z0-9_-]+)*")
_HMP_QEMU_IO = re.compile(r'qemu-io +(?:-d +)?[A-Za-z0-9_/-]+ +"[^"]*"')


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


@dataclasses.dataclass(frozen=True)
class VmRecord:
    id: str
    name: str
    cpus: int
    memory_mb: int
    kernel: str | None
    initrd: str | None
    append: str | None
    state: str
    vm_dir: Path
    disks: tuple[Path, ...]
    owned: tuple[bool, ...]


# Returns (replication_state, replication_health, replication_mode) for a VM id; the
# replication engine installs it so that `vm get` shows replication columns.
ReplicationInfo = Callable[[str], tuple[str, str | None, str | None]]


class VmService:
    def __init__(self, db: Database, events: EventLog, config: HostConfig) -> None:
        self._db = db
        self._events = events
        self._config = config
        self._running: dict[str, qemu.QemuVm] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.replication_info: ReplicationInfo = lambda _id: ("Disabled", None, None)
        # Hooks for the replication engine: a VM about to start, and a VM that went off.
        self.start_guards: list[Callable[[VmRecord], None]] = []
        self.remove_guards: list[Callable[[VmRecord], None]] = []
        # Places a VM's disk may not be (replica storage): each raises to refuse a path.
        self.disk_guards: list[Callable[[Path], None]] = []
        # Directories a replica VM's own storage may be in, for `vm remove --delete-storage`.
        self.storage_roots: Callable[[], list[Path]] = lambda: []
        self.on_off: list[Callable[[VmRecord, bool], None]] = []

    @property
    def vms_dir(self) -> Path:
        return self._config.state_dir / "vms"

    def run_dir(self, vm_id: str) -> Path:
        # Short on purpose: a unix socket path must stay under 108 bytes.
        return self._config.state_dir / "run" / vm_id[:8]

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # -- reading ---------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> VmRecord:
        disks = self._db.query(
            "SELECT path, owned FROM vm_disks WHERE vm_id=? ORDER BY idx", (row["id"],)
        )
        return VmRecord(
            id=row["id"],
            name=row["name"],
            cpus=row["cpus"],
            memory_mb=row["memory_mb"],
            kernel=row["kernel"],
            initrd=row["initrd"],
            append=row["append"],
            state=row["state"],
            vm_dir=Path(row["vm_dir"]),
            disks=tuple(Path(d["path"]) for d in disks),
            owned=tuple(bool(d["owned"]) for d in disks),
        )

    def records(self) -> list[VmRecord]:
        return [self._record(r) for r in self._db.query("SELECT * FROM vms ORDER BY name")]

    def find(self, name: str) -> VmRecord:
        row = self._db.query_one("SELECT * FROM vms WHERE name=?", (name,))
        if row is None or row["state"] in (CREATING, REMOVING):
            raise NotFound(f"no VM named {name!r} on {self._config.name}")
        return self._record(row)

    def by_id(self, vm_id: str) -> VmRecord | None:
        row = self._db.query_one("SELECT * FROM vms WHERE id=?", (vm_id,))
        return None if row is None else self._record(row)

    def to_model(self, rec: VmRecord) -> Vm:
        rstate, rhealth, rmode = self.replication_info(rec.id)
        return Vm(
            computer_name=self._config.name,
            name=rec.name,
            id=rec.id,
            state=rec.state,
            cpus=rec.cpus,
            memory_mb=rec.memory_mb,
            disks=[str(d) for d in rec.disks],
            replication_state=rstate,
            replication_health=rhealth,
            replication_mode=rmode,
        )

    def list(self) -> list[Vm]:
        return [self.to_model(r) for r in self.records() if r.state not in (CREATING, REMOVING)]

    def get(self, name: str) -> Vm:
        return self.to_model(self.find(name))

    def spec(self, rec: VmRecord) -> qemu.VmSpec:
        return qemu.VmSpec(
            id=rec.id,
            name=rec.name,
            cpus=rec.cpus,
            memory_mb=rec.memory_mb,
            disks=rec.disks,
            kernel=Path(rec.kernel) if rec.kernel else None,
            initrd=Path(rec.initrd) if rec.initrd else None,
            append=rec.append,
            accel=self._config.accel,
            run_dir=self.run_dir(rec.id),
        )

    def process(self, vm_id: str) -> qemu.QemuVm | None:
        return self._running.get(vm_id)

    # -- creating and removing -------------------------------------------------------------

    async def new(self, req: VmRequest, vm_id: str | None = None) -> Vm:
        name = validate.vm_name(req.name)
        if self._db.query_one("SELECT 1 FROM vms WHERE name=?", (name,)):
            raise InvalidState(f"a VM named {name!r} already exists on {self._config.name}")
        memory_mb = qemu_img.parse_size(req.memory) // (1024 * 1024)
        if memory_mb < 16:
            raise InvalidArgument(f"invalid memory size {req.memory!r}: at least 16M is needed")
        if memory_mb > (host_mb := validate.host_memory_mb()):
            raise InvalidArgument(
                f"invalid memory size {req.memory!r}: this host has {host_mb} MiB, so the VM "
                "could never start here"
            )
        if not 1 <= req.cpus <= 64:
            raise InvalidArgument(f"invalid CPU count {req.cpus}: expected 1 to 64")
        kernel, initrd = (
            _optional_file(req.kernel, "kernel"),
            _optional_file(req.initrd, "initrd"),
        )
        if initrd and not kernel:
            raise InvalidArgument("--initrd needs --kernel")
        # Validate every disk before creating anything, so that bad input changes nothing.
        plan: list[tuple[DiskRequest, int | None, Path | None]] = []
        for disk in req.disks:
            if sum(v is not None for v in (disk.size, disk.path, disk.parent)) != 1:
                raise InvalidArgument(
                    "each disk is one of --disk SIZE, --disk-path PATH or --disk-parent PATH"
                )
            if disk.size is not None:
                plan.append((disk, qemu_img.parse_size(disk.size), None))
            else:
                image = Path(str(disk.path or disk.parent)).absolute()
                flag = "--disk-path" if disk.path else "--disk-parent"
                if not image.is_file():
                    raise NotFound(f"{flag} {image}: no such image")
                if disk.path is not None:
                    self._check_disk_is_free(image, flag)
                await qemu_img.info(image)
                plan.append((disk, None, image))
        vm_id = vm_id or str(uuid.uuid4())
        vm_dir = validate.child_path(self.vms_dir, name)
        if vm_dir.exists():
            raise InvalidState(f"{vm_dir} already exists: remove it or choose another VM name")
        paths: list[tuple[Path, bool]] = []
        for i, (disk, _size, existing) in enumerate(plan):
            if disk.path is not None and existing is not None:
                paths.append((existing, False))
            else:
                paths.append((vm_dir / f"disk{i}.qcow2", True))
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO vms(id, name, cpus, memory_mb, kernel, initrd, append, state, vm_dir, created) "
                "VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    vm_id,
                    name,
                    req.cpus,
                    memory_mb,
                    kernel,
                    initrd,
                    req.append,
                    CREATING,
                    str(vm_dir),
                    now_iso(),
                ),
            )
            for i, (path, owned) in enumerate(paths):
                conn.execute(
                    "INSERT INTO vm_disks(vm_id, idx, path, owned) VALUES(?,?,?,?)",
                    (vm_id, i, str(path), int(owned)),
                )
        try:
            vm_dir.mkdir(parents=True)
            for (_disk, size, parent), (path, owned) in zip(plan, paths, strict=True):
                if owned and size is not None:
                    await qemu_img.create(path, size)
                elif owned and parent is not None:
                    parent_size = await qemu_img.virtual_size(parent)
                    await qemu_img.create(path, parent_size, backing=parent)
        except BaseException:
            await self._discard(self._record(self._row(vm_id)))
            raise
        with self._db.tx() as conn:
            conn.execute("UPDATE vms SET state=? WHERE id=?", (OFF, vm_id))
            self._events.record(
                "vm-created", f"created VM {name} ({vm_id})", vm_name=name, conn=conn
            )
        return self.get(name)

    def register(
        self,
        conn: sqlite3.Connection,
        vm_id: str,
        name: str,
        cpus: int,
        memory_mb: int,
        vm_dir: Path,
        disks: Sequence[Path],
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
    ) -> None:
        """Record a VM whose disks another engine made (a replica VM), inside its transaction."""
        if conn.execute("SELECT 1 FROM vms WHERE name=? OR id=?", (name, vm_id)).fetchone():
            raise InvalidState(
                f"a VM named {name!r} (or with id {vm_id}) already exists on {self._config.name}"
            )
        conn.execute(
            "INSERT INTO vms(id, name, cpus, memory_mb, kernel, initrd, append, state, vm_dir, created) "
            "VALUES(?,?,?,?,?,?,?,?,?,?)",
            (vm_id, name, cpus, memory_mb, kernel, initrd, append, OFF, str(vm_dir), now_iso()),
        )
        for i, path in enumerate(disks):
            conn.execute(
                "INSERT INTO vm_disks(vm_id, idx, path, owned) VALUES(?,?,?,?)",
                (vm_id, i, str(path), 0),
            )

    def set_disks(self, conn: sqlite3.Connection, vm_id: str, disks: Sequence[Path]) -> None:
        """Point a VM at other disk files (failover overlays, reversed chains)."""
        conn.execute("DELETE FROM vm_disks WHERE vm_id=?", (vm_id,))
        for i, path in enumerate(disks):
            conn.execute(
                "INSERT INTO vm_disks(vm_id, idx, path, owned) VALUES(?,?,?,?)",
                (vm_id, i, str(path), 0),
            )

    async def unregister(self, vm_id: str) -> None:
        """Forget a VM whose files another engine owns (a test-failover VM), stopping it first."""
        rec = self.by_id(vm_id)
        if rec is None:
            return
        async with self.lock(vm_id):
            if self._running.get(vm_id) is not None:
                await self._stop_process(rec, force=True, timeout=0)
            with self._db.tx() as conn:
                conn.execute("DELETE FROM vms WHERE id=?", (vm_id,))
            shutil.rmtree(self.run_dir(vm_id), ignore_errors=True)

    async def ensure_off(self, vm_id: str) -> None:
        rec = self.by_id(vm_id)
        if rec is not None and rec.state == RUNNING:
            async with self.lock(vm_id):
                await self._stop_process(rec, force=True, timeout=0)

    def _check_disk_is_free(self, image: Path, what: str, owner: str | None = None) -> None:
        """A disk used in place must be no other VM's disk, nor anything the agent keeps (its
        state directory, replica storage): two writers would corrupt it."""
        real = image.resolve()
        if (
            real == self._config.state_dir.resolve()
            or self._config.state_dir.resolve() in real.parents
        ):
            raise InvalidArgument(f"{what} {image}: a file of the agent's state directory")
        for row in self._db.query("SELECT vm_id, path FROM vm_disks"):
            if row["vm_id"] != owner and Path(row["path"]).resolve() == real:
                other = self.by_id(row["vm_id"])
                name = other.name if other else row["vm_id"]
                raise InvalidArgument(f"{what} {image}: it is a disk of VM {name}")
        for guard in self.disk_guards:
            guard(real)

    def _row(self, vm_id: str) -> sqlite3.Row:
        row = self._db.query_one("SELECT * FROM vms WHERE id=?", (vm_id,))
        assert row is not None
        return row

    async def _discard(self, rec: VmRecord) -> None:
        """Delete a VM's own files, then its row; safe to repeat after a crash."""
        for path, owned in zip(rec.disks, rec.owned, strict=True):
            if owned:
                path.unlink(missing_ok=True)
        if rec.vm_dir.is_dir() and rec.vm_dir.resolve().parent == self.vms_dir.resolve():
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir(rec.id), ignore_errors=True)
        for j in self._db.query(
            "SELECT data FROM journal WHERE kind='delete-storage' AND subject=?", (rec.id,)
        ):
            shutil.rmtree(json.loads(j["data"])["path"], ignore_errors=True)
        with self._db.tx() as conn:
            conn.execute("DELETE FROM vms WHERE id=?", (rec.id,))
            conn.execute("DELETE FROM journal WHERE kind='delete-storage' AND subject=?", (rec.id,))

    async def remove(self, name: str, force: bool = False, delete_storage: bool = False) -> Vm:
        """Remove a VM and the disks it created; ``delete_storage`` also deletes the replica
        storage a replica VM had (journaled, so a crash midway finishes the deletion)."""
        rec = self.find(name)
        async with self.lock(rec.id):
            rec = self.find(name)
            for guard in self.remove_guards:
                guard(rec)
            storage = self._own_storage(rec) if delete_storage else None
            if rec.state == RUNNING:
                if not force:
                    raise InvalidState(f"VM {name} is running: stop it first, or use --force")
                await self._stop_process(rec, force=True, timeout=0)
            model = self.to_model(rec)
            with self._db.tx() as conn:
                conn.execute("UPDATE vms SET state=? WHERE id=?", (REMOVING, rec.id))
                if storage is not None:
                    conn.execute(
                        "INSERT INTO journal(kind, subject, step, data, created) "
                        "VALUES('delete-storage', ?, 'start', ?, ?)",
                        (rec.id, json.dumps({"path": str(storage)}), now_iso()),
                    )
            await self._discard(rec)
            what = f"removed VM {name}"
            if storage is not None:
                what += f" and its replica storage {storage}"
            self._events.record("vm-removed", what, vm_name=name)
            return model

    def _own_storage(self, rec: VmRecord) -> Path:
        """The directory of a (former) replica VM, only if it is one of a storage location's."""
        roots = [r.resolve() for r in self.storage_roots()]
        folder = rec.vm_dir.resolve()
        if folder.parent not in roots or rec.vm_dir.resolve().parent == self.vms_dir.resolve():
            raise InvalidArgument(
                f"VM {rec.name} has no replica storage of its own (its folder {rec.vm_dir} is not "
                "in a replica storage location): --delete-storage applies to replica VMs"
            )
        return folder

    # -- running ---------------------------------------------------------------------------

    def _set_state(self, vm_id: str, state: str) -> None:
        with self._db.tx() as conn:
            conn.execute("UPDATE vms SET state=? WHERE id=?", (state, vm_id))

    async def start(self, name: str) -> Vm:
        rec = self.find(name)
        async with self.lock(rec.id):
            rec = self.find(name)
            if rec.state == RUNNING:
                raise InvalidState(f"VM {name} is already running")
            for guard in self.start_guards:
                guard(rec)
            for disk in rec.disks:
                for row in self._db.query(
                    "SELECT vm_id FROM vm_disks WHERE path=? AND vm_id<>?", (str(disk), rec.id)
                ):
                    other = self.by_id(row["vm_id"])
                    raise InvalidState(
                        f"VM {name} cannot start: its disk {disk} is also a disk of VM "
                        f"{other.name if other else row['vm_id']}"
                    )
            self.run_dir(rec.id).mkdir(parents=True, exist_ok=True)
            process = await qemu.launch(self.spec(rec))
            self._set_state(rec.id, RUNNING)
            self._adopt(rec, process)
            self._events.record(
                "vm-started", f"started VM {name} (pid {process.pid})", vm_name=name
            )
        return self.get(name)

    def _adopt(self, rec: VmRecord, process: qemu.QemuVm) -> None:
        self._running[rec.id] = process
        self._watchers[rec.id] = asyncio.create_task(
            self._watch(rec.id, process), name=f"watch-{rec.name}"
        )

    async def _watch(self, vm_id: str, process: qemu.QemuVm) -> None:
        """Notice a guest that powered itself off, or a QEMU that died, and record it as Off."""
        clean = await process.wait_exit_or_shutdown()
        rec = self.by_id(vm_id)
        if rec is None or self._running.get(vm_id) is not process:
            return
        async with self.lock(vm_id):
            if self._running.get(vm_id) is not process:
                return
            if clean:
                with contextlib.suppress(VmrError):
                    await process.quit()
            await self._went_off(
                rec, clean, "the guest powered off" if clean else "the QEMU process died"
            )

    async def _went_off(self, rec: VmRecord, clean: bool, why: str) -> None:
        self._running.pop(rec.id, None)
        self._watchers.pop(rec.id, None)
        self._set_state(rec.id, OFF)
        level = "info" if clean else "error"
        self._events.record(
            "vm-off" if clean else "vm-died", f"VM {rec.name} is off: {why}", rec.name, level
        )
        for hook in self.on_off:
            hook(rec, clean)

    async def _stop_process(self, rec: VmRecord, force: bool, timeout: float) -> None:
        process = self._running.get(rec.id)
        watcher = self._watchers.pop(rec.id, None)
        if watcher is not None:
            watcher.cancel()
        if process is None:
            self._set_state(rec.id, OFF)
            return
        if not force:
            await process.powerdown()
            if not await process.wait_shutdown(timeout):
                self._watchers[rec.id] = asyncio.create_task(self._watch(rec.id, process))
                raise InvalidState(
                    f"VM {rec.name} did not power off within {timeout:.0f} s (the guest ignored the "
                    "ACPI request): use `vm stop --force` to kill it"
                )
            await process.quit()
            clean = True
        else:
            # Turned off like a power cut for the guest, but QEMU still closes the images, so
            # their change tracking survives; SIGKILL only if QEMU does not obey.
            try:
                await process.quit(timeout=10.0)
                clean = True
            except VmrError:
                await process.kill()
                clean = False
        why = "stopped by the operator" + (" (turned off)" if force else "")
        await self._went_off(rec, clean=clean, why=why)

    async def stop(
        self, name: str, force: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT
    ) -> Vm:
        rec = self.find(name)
        async with self.lock(rec.id):
            rec = self.find(name)
            if rec.state != RUNNING:
                raise InvalidState(f"VM {name} is not running")
            await self._stop_process(rec, force=force, timeout=timeout)
        return self.get(name)

    async def monitor(self, name: str, command: str) -> str:
        """Read-only HMP ``info`` commands; ``qemu-io`` only where host.toml allows it (tests).

        HMP as a whole is root on the host (``migrate "exec:…"`` runs a shell command,
        ``dump-guest-memory`` writes any file), so nothing else passes.
        """
        line = command.strip()
        allowed = _HMP_INFO.fullmatch(line) is not None or (
            self._config.allow_qemu_io and _HMP_QEMU_IO.fullmatch(line) is not None
        )
        if not allowed:
            raise AccessDenied(
                f"vm monitor runs only read-only `info` commands, not {line.split()[0] if line else '(empty)'!r}"
                + (
                    ""
                    if self._config.allow_qemu_io
                    else " (qemu-io needs allow_qemu_io in host.toml, for tests)"
                )
            )
        rec = self.find(name)
        process = self._running.get(rec.id)
        if process is None:
            raise InvalidState(f"VM {name} is not running")
        return await process.hmp(line)

    # -- agent life cycle ------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish interrupted creations and removals; reattach to VMs left running. One VM that
        cannot be recovered is reported and left as it is: it must not keep the others down."""
        for rec in self.records():
            try:
                await self._recover_one(rec)
            except Exception as e:
                if not isinstance(e, VmrError):
                    log.exception("recovery of VM %s failed", rec.name)
                self._events.record(
                    "vm-recovery-failed", f"cannot recover VM {rec.name}: {e}", rec.name, "error"
                )

    async def _recover_one(self, rec: VmRecord) -> None:
        if rec.state in (CREATING, REMOVING):
            log.info("finishing interrupted %s of VM %s", rec.state.lower(), rec.name)
            await self._discard(rec)
            return
        if rec.state != RUNNING:
            return
        process = await qemu.attach(self.spec(rec))
        if process is None:
            await self._went_off(rec, False, "its QEMU process ended while the agent was down")
            return
        if await process.status() == "shutdown":
            with contextlib.suppress(VmrError):
                await process.quit()
            await self._went_off(rec, True, "the guest powered off while the agent was down")
            return
        self._adopt(rec, process)
        self._events.record(
            "vm-reattached",
            f"reattached to running VM {rec.name} (pid {process.pid})",
            rec.name,
        )

    async def detach_all(self) -> None:
        """On agent shutdown: let VMs run on, dropping only our QMP connections."""
        for task in self._watchers.values():
            task.cancel()
        for process in self._running.values():
            with contextlib.suppress(VmrError):
                await process.disconnect()
        self._watchers.clear()
        self._running.clear()


def _optional_file(value: str | None, kind: str) -> str | None:
    if value is None:
        return None
    path = Path(value).absolute()
    if not path.is_file():
        raise NotFound(f"--{kind} {path}: no such file")
    validate.boot_image(path, kind)
    return str(path)
