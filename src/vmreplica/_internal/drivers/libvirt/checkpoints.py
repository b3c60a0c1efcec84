"""Change tracking through libvirt's checkpoints and backups, never behind libvirt's back.

Generation G of a VM is libvirt checkpoint ``vmr-G``: a persistent bitmap ``vmr-G`` in each
replicated qcow2 image, which libvirt creates, keeps active (libvirt ≥ 6.6 leaves every
checkpoint's bitmap recording: checkpoint G holds everything written since G) and deletes.

- cut(G): one ``virDomainBackupBegin`` in push mode, ``<incremental>vmr-G</incremental>``, with
  the checkpoint ``vmr-(G+1)`` created by the same call, atomically for all disks: QEMU's backup
  job copies G's clusters into a new sparse qcow2 per disk (the same delta the QEMU driver cuts).
  Push won over pull (bench/bench_libvirt_cycle.py, docs/ARCHITECTURE.md).
- drop(G): delete checkpoint ``vmr-G`` once the delta is durable and committed.
- settle(G): abort a backup job an earlier agent left, delete every other ``vmr-*`` checkpoint.
  Since ``vmr-G`` kept recording through a failed cut, nothing needs merging back: G+1 simply
  goes. A missing ``vmr-G`` is ResyncRequired.

Pull mode (an NBD server of libvirt's on a unix socket, ``<scratch>`` fleecing images) serves
what must be read rather than copied whole: the initial copy's point-in-time view, a
generation's dirty ranges (the export's ``qemu:dirty-bitmap:backup-<disk>`` context), and
chosen ranges of the disks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from vmreplica._internal import faults
from vmreplica._internal.drivers.libvirt import domain_xml
from vmreplica._internal.drivers.libvirt.connection import Connection, is_missing, message
from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica._internal.files import fsync_dir
from vmreplica.errors import InvalidState, NotFound, ResyncRequired, StorageError, VmrError

PREFIX = "vmr-"
_NAME_RE = re.compile(r"^vmr-(\d+)$")
_JOB_TIMEOUT = 3600.0
_POLL = 0.05
_ORPHAN = "bitmap already exists: backup-"


def remove_orphan_backup_bitmaps(dom: Any) -> list[str]:
    """The temporary ``backup-<disk>`` bitmaps a backup job leaves in QEMU when libvirtd dies
    during it: libvirt's new daemon has forgotten the job, the bitmaps stay (never persistent,
    never a checkpoint's), and every later backup of the domain fails on them. Removed through
    libvirt's monitor passthrough, only when libvirt has no backup job of the domain; the
    checkpoints' own bitmaps (``vmr-*``, persistent) are never touched."""

    def qmp(command: str, **arguments: Any) -> Any:
        text = json.dumps({"execute": command, "arguments": arguments})
        return json.loads(libvirt_qemu.qemuMonitorCommand(dom, text, 0)).get("return")

    removed = []
    for node in qmp("query-named-block-nodes", flat=True) or []:
        for bitmap in node.get("dirty-bitmaps", []):
            name_ = str(bitmap.get("name", ""))
            if name_.startswith("backup-") and not bitmap.get("persistent", False):
                qmp("block-dirty-bitmap-remove", node=node["node-name"], name=name_)
                removed.append(name_)
    return removed


def name(generation: int) -> str:
    return f"{PREFIX}{generation}"


class Tracker:
    """The checkpoints and backups of one domain (by UUID), on its replicated disks."""

    def __init__(self, conn: Connection, vm_id: str, disks: Sequence[str], all_disks: Sequence[str],
                 vm_name: str) -> None:  # fmt: skip
        self.conn = conn
        self.vm_id = vm_id
        self.disks = tuple(disks)
        self.all_disks = tuple(all_disks)
        self.what = f"VM '{vm_name}'"

    async def _run(self, what: str, fn: Any) -> Any:
        return await self.conn.run(
            f"{what} of {self.what}", lambda c: fn(c.lookupByUUIDString(self.vm_id))
        )

    async def generations(self) -> dict[int, Any]:
        def ours(dom: Any) -> dict[int, Any]:
            out = {}
            for cp in dom.listAllCheckpoints():
                match = _NAME_RE.match(cp.getName())
                if match:
                    out[int(match.group(1))] = cp
            return out

        found: dict[int, Any] = await self._run("checkpoints", ours)
        return found

    async def _delete(self, generation: int) -> None:
        def delete(dom: Any) -> None:
            try:
                cp = dom.checkpointLookupByName(name(generation))
            except libvirt.libvirtError as exc:
                if is_missing(exc):
                    return
                raise
            try:
                cp.delete()
            except libvirt.libvirtError:
                # Its bitmap is gone already (an image replaced under the domain): only
                # libvirt's record of it remains.
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

        await self._run(f"deleting checkpoint {name(generation)}", delete)

    async def abort_backup(self) -> None:
        """End a backup job an earlier agent (or a failed call) left on the domain."""

        def abort(dom: Any) -> bool:
            try:
                dom.backupGetXMLDesc()
            except libvirt.libvirtError as exc:
                if is_missing(exc) or "no domain backup job" in message(exc).lower():
                    return False
                raise
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            return True

        if await self._run("backup job", abort):
            await self._wait_job()

    async def _wait_job(self, timeout: float = _JOB_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self._run("job", lambda dom: dom.jobInfo())
            if int(info[0]) == libvirt.VIR_DOMAIN_JOB_NONE:
                return
            if loop.time() > deadline:
                raise VmrError(f"the backup job of {self.what} did not end in {timeout:g}s")
            await asyncio.sleep(_POLL)

    async def _begin(self, backup: str, checkpoint: str | None, flags: int) -> None:
        """``virDomainBackupBegin``; once more after removing the temporary bitmaps a job
        left when libvirtd died during it (remove_orphan_backup_bitmaps)."""
        try:
            await self._run(
                "starting a backup", lambda dom: dom.backupBegin(backup, checkpoint, flags)
            )
            return
        except VmrError as exc:
            if _ORPHAN not in exc.message.lower():
                raise
        await self.abort_backup()  # a job libvirt still knows is ended through libvirt
        await self._run("removing a dead backup job's bitmaps", remove_orphan_backup_bitmaps)
        await self._run("starting a backup", lambda dom: dom.backupBegin(backup, checkpoint, flags))

    async def settle(self, generation: int) -> None:
        await self.abort_backup()
        gens = await self.generations()
        if generation not in gens:
            raise ResyncRequired(
                f"change tracking of {self.what} was lost (checkpoint {name(generation)} is "
                "missing): a resynchronization is required"
            )
        for g in sorted((g for g in gens if g != generation), reverse=True):
            await self._delete(g)

    async def start(self, generation: int) -> None:
        """Tracking anew: every checkpoint of ours goes, ``generation`` starts now."""
        await self.remove_all()
        xml = domain_xml.checkpoint_xml(name(generation), self.disks, self.all_disks)
        await self._run("creating a checkpoint", lambda dom: dom.checkpointCreateXML(xml))

    async def remove_all(self) -> None:
        await self.abort_backup()
        for g in sorted(await self.generations(), reverse=True):
            await self._delete(g)

    async def drop(self, generation: int) -> None:
        await self._delete(generation)

    async def cut(self, generation: int, dests: Sequence[Path], sizes: Sequence[int]) -> None:
        """Push mode: G's clusters into new qcow2 ``dests`` (of the disks' ``sizes``); G+1
        starts at the same instant.

        The targets are made here, standalone, and handed to libvirt as they are
        (``REUSE_EXTERNAL``): libvirt would make each one with the disk as its backing file,
        which a delta must not have.
        """
        files = [Path(d).absolute() for d in dests]
        for f in files:
            if f.exists():
                raise InvalidState(f"cannot cut a delta of {self.what}: {f} already exists")
        backup = domain_xml.backup_xml(
            "push", self.disks, self.all_disks, files, incremental=name(generation)
        )
        checkpoint = domain_xml.checkpoint_xml(name(generation + 1), self.disks, self.all_disks)
        ok = False
        try:
            for f, size in zip(files, sizes, strict=True):
                await qemu_img.create(f, size)
            try:
                await self._begin(
                    backup, checkpoint, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
                )
            except VmrError as exc:
                if "inconsistent" in exc.message.lower():
                    raise ResyncRequired(
                        f"change tracking of {self.what} is inconsistent (the disk was not "
                        f"closed cleanly): a resynchronization is required ({exc.message})"
                    ) from exc
                raise
            await faults.ahit("libvirt.push_job")  # the backup job runs (tests kill libvirtd)
            await self._wait_job()
            stats = await self._run(
                "job result", lambda dom: dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            )
            if int(stats.get("type", -1)) != libvirt.VIR_DOMAIN_JOB_COMPLETED:
                reason = str(stats.get("errmsg") or "failed")
                full = "No space left" in reason
                raise StorageError(
                    f"{'disk full: ' if full else ''}the delta of {self.what} failed: {reason}"
                )
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(VmrError):
                    await self.abort_backup()
                with contextlib.suppress(VmrError):
                    await self._delete(generation + 1)
                for f in files:
                    f.unlink(missing_ok=True)
        for parent in sorted({f.parent for f in files}):
            fsync_dir(parent)

    @contextlib.asynccontextmanager
    async def pull(
        self,
        work: Path,
        incremental: int | None = None,
        checkpoint: int | None = None,
    ) -> AsyncIterator[Path]:
        """A pull-mode backup: the replicated disks as NBD exports named by their targets on
        the yielded unix socket, as they were when it began (incremental: with the dirty
        bitmap of checkpoint ``incremental`` as ``qemu:dirty-bitmap:backup-<target>``);
        ``checkpoint``: a new checkpoint created at that same instant."""
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket = work / "backup.sock"
        socket.unlink(missing_ok=True)
        scratch = [work / f"scratch-{d}.qcow2" for d in self.disks]
        for s in scratch:
            s.unlink(missing_ok=True)
        backup = domain_xml.backup_xml(
            "pull", self.disks, self.all_disks, scratch,
            incremental=None if incremental is None else name(incremental), socket=socket,
        )  # fmt: skip
        cp = (
            None
            if checkpoint is None
            else domain_xml.checkpoint_xml(name(checkpoint), self.disks, self.all_disks)
        )
        await self.abort_backup()
        await self._begin(backup, cp, 0)
        try:
            await faults.ahit("libvirt.pull_job")  # the NBD export is up (tests kill libvirtd)
            yield socket
        finally:
            with contextlib.suppress(VmrError, NotFound):
                await self.abort_backup()
            for s in scratch:
                s.unlink(missing_ok=True)
