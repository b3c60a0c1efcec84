"""The replica's side of an initial copy: new images served for the sender's copy
(initial-open), then adopted as the chains' base once the sender says the copy is complete
(initial-close). What a copy that did not finish wrote is kept as the chains' base (kept.py),
for the retry to compare against; a new copy replaces it when it finishes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.laps import Laps
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.common import (
    chains,
    check_not_quarantined,
    check_sender,
    redirect_if_elsewhere,
    replica_row,
    staging_dir,
)
from vmreplica._internal.engine.replica.kept import keep_cut_copy
from vmreplica._internal.engine.replica.recovery import ReplicaRecovery
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.files import fsync_dir, fsync_file
from vmreplica._internal.ports.hypervisor import ImportTarget, NbdPsk
from vmreplica._internal.store.replications import COMPARED, KEPT, OFFLINE, ReplicationRow
from vmreplica._internal.transport import answers
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import InvalidState, StorageError, VmrError

log = logging.getLogger("vmreplica.replica")


@dataclasses.dataclass(frozen=True)
class PeerTls:
    """The sender's client-certificate subject, as the copy's TLS authorizes it."""

    subject: str


class InitialImport:
    def __init__(
        self, ctx: Context, vms: VmService, applier: Applier, recovery: ReplicaRecovery,
        imports: dict[str, tuple[ImportTarget, str]],
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._applier = applier
        self._recovery = recovery
        # Open imports, by VM id: what serves the new images, and when the copy started.
        self._imports = imports

    async def open(
        self, authz: Authorization, peer_names: list[str], req: p.InitialOpenRequest, *,
        listen_host: str, credentials: PeerTls | NbdPsk,
    ) -> answers.InitialOpenAnswer:  # fmt: skip
        """``credentials``: the sender's certificate subject (the copy's TLS then uses this
        host's certificates), or the key both sides derived (Kerberos)."""
        laps = Laps()
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            row = replica_row(self._ctx, row.vm_id)
            check_not_quarantined(self._ctx, row)
            if row.state == State.WAITING_FOR_INITIAL and row.initial_kind == OFFLINE:
                # The primary copies over the network after all: media it wrote is superseded.
                shutil.rmtree(Path(str(row.storage_dir)) / "queued", ignore_errors=True)
                self._ctx.stores.replications.update(
                    row.vm_id, initial_kind=None, initial_media=None, sequence=0
                )
                row = replica_row(self._ctx, row.vm_id)
            # A kept cut copy keeps its kind: its base holds data until this copy replaces it.
            superseded = [kind for kind in COMPARED if kind != KEPT]
            if row.state == State.WAITING_FOR_INITIAL and row.initial_kind in superseded:
                # A full copy supersedes the copy compared against (a seed, or the empty chain
                # of a stopped start-initial --compressed): it becomes the base instead.
                self._ctx.stores.replications.update(row.vm_id, initial_kind=None)
                row = replica_row(self._ctx, row.vm_id)
            if row.state != State.WAITING_FOR_INITIAL or row.sequence != 0:
                raise InvalidState(
                    f"replica VM {row.vm_name} already has its initial copy (state {row.state})"
                )
            await self.close_import(row.vm_id)
            staging = staging_dir(row, 1)
            _check_space(row, Path(str(row.storage_dir)), req.required_bytes)
            shutil.rmtree(staging, ignore_errors=True)
            files = [disk_file(staging, n) for n in range(len(row.disks))]
            sizes = await asyncio.gather(*(c.virtual_size() for c in chains(self._ctx, row)))
            laps.lap("sizes")
            with _discarded_on_failure(
                staging, f"cannot prepare the initial copy of {row.vm_name}"
            ):
                staging.mkdir(parents=True)
                tls, identity = (
                    (self._ctx.config.tls, credentials.subject)
                    if isinstance(credentials, PeerTls)
                    else (credentials, credentials.username)
                )
                target = await self._ctx.driver.open_import(
                    files, sizes, self._vms.run_dir(row.vm_id), row.vm_name, tls, identity,
                    listen_host, self._ctx.config.initial_copy_ports,
                )  # fmt: skip
            self._imports[row.vm_id] = (target, now_iso())
        laps.lap("import")
        log.info(
            "initial copy of %s: serving %d images on port %d (%s)",
            row.vm_name, len(files), target.port, laps,
        )  # fmt: skip
        return answers.InitialOpenAnswer(target.port, target.exports)

    async def close(
        self, authz: Authorization, peer_names: list[str], req: p.InitialCloseRequest
    ) -> answers.SequenceAnswer:
        """The sender's copy ended: adopt the images as the chains' base, or drop them."""
        await redirect_if_elsewhere(self._ctx, req.vm_id)  # in a cluster: the owner answers
        row = replica_row(self._ctx, req.vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        async with self._ctx.locks.replica(row.vm_id):
            row = replica_row(self._ctx, row.vm_id)
            if not req.ok:  # cut, stopped or failed: what arrived is kept
                await self.close_import(row.vm_id, keep=True)
                return answers.SequenceAnswer(row.sequence)
            if row.sequence >= 1:  # a retried close: it was applied already
                return answers.SequenceAnswer(row.sequence, row.initial_size or 0)
            opened = self._imports.pop(row.vm_id, None)
            if opened is None:
                raise InvalidState(
                    f"no initial copy of {row.vm_name} is open on {self._ctx.host} (did it "
                    "restart?): the next start compares against what it kept"
                )
            target, started = opened
            staging = staging_dir(row, 1)
            laps = Laps()
            with _discarded_on_failure(staging, f"cannot sync the initial copy of {row.vm_name}"):
                await target.finish()
                laps.lap("close")
                size = await asyncio.to_thread(_sync_files, staging)
                laps.lap("sync")
            self._applier.journal(row.vm_id, 1, staging, started, size=size)
            faults.hit("replica.after_stage")
            await self._recovery.apply(row, 1, staging, started, size)
            if self._ctx.cluster is not None:  # the facts beside the chains (handoff.py)
                handoff.export(self._ctx, row.vm_id)
            laps.lap("adopt")
            log.info("initial copy of %s adopted (%s)", row.vm_name, laps)
            return answers.SequenceAnswer(1, size)

    async def close_import(self, vm_id: str, keep: bool = False) -> None:
        """Stop serving the import; with ``keep``, what the copy wrote becomes the chains' base
        (kept.py), else it goes."""
        opened = self._imports.pop(vm_id, None)
        if opened is not None and keep:
            # Closed, not killed: killed, its images' metadata would not say what arrived.
            with contextlib.suppress(VmrError):  # then killed (finish), and less is kept
                await opened[0].finish()
        elif opened is not None:
            await opened[0].discard()
        row = self._ctx.stores.replications.find(vm_id)
        if row is None or row.storage_dir is None or row.sequence != 0:
            return
        if not (keep and await keep_cut_copy(self._ctx, row)):
            shutil.rmtree(staging_dir(row, 1), ignore_errors=True)

    async def close_all(self) -> None:
        """The agent stops: the copies it served are cut, and kept for their retries."""
        for vm_id in list(self._imports):
            async with self._ctx.locks.replica(vm_id):  # not beside a close of the same copy
                await self.close_import(vm_id, keep=True)


@contextlib.contextmanager
def _discarded_on_failure(staging: Path, what: str) -> Iterator[None]:
    """Whatever fails, the copy's images go; a file-system error is reported as storage's."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise StorageError(f"{what}: {e}") from e
        raise


def _check_space(row: ReplicationRow, storage: Path, required: int) -> None:
    """Refuse a copy that cannot fit before it starts, rather than hours into it."""
    free = shutil.disk_usage(storage).free
    if required > free:
        raise StorageError(
            f"disk full: the initial copy of {row.vm_name} needs {required} bytes on the replica, "
            f"{free} are free in {storage}"
        )


def _sync_files(directory: Path) -> int:
    """fsync the images and their names; the space they take is the size of the copy."""
    size = sum(fsync_file(path) for path in sorted(directory.glob("disk*.qcow2")))
    fsync_dir(directory)
    return size
