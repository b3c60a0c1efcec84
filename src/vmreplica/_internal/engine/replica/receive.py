"""Receiving deltas on the replica.

A delta is refused before a byte is stored when the sender is not the server that created the
replica VM and not in its trust group, or when its sequence number is not exactly the next one;
once staged, it is refused (and removed) unless every disk of the VM is in it as a standalone
qcow2 of the disk's size. Only then is it journaled and applied (replica/recovery.py).

A delta of a resynchronization (an initial copy as compressed deltas is one) is acknowledged
once it is staged, verified and journaled, which makes it durable (a restart applies it); its
apply runs behind the answer, holding the VM's replica lock, while the next delta is staged.
So the link does not idle while the replica applies. One stream per VM at a time (the ``stream``
lock), and a delta is journaled only once the one before it is applied.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.common import (
    chains,
    check_not_quarantined,
    check_sender,
    received_sequence,
    redirect_if_elsewhere,
    replica_row,
    staging_dir,
)
from vmreplica._internal.engine.replica.media import MediaImport
from vmreplica._internal.engine.replica.recovery import ReplicaRecovery
from vmreplica._internal.engine.states import State
from vmreplica._internal.store.replications import OFFLINE, ReplicationRow
from vmreplica._internal.transport import answers, delta_receive
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import (
    IntegrityError,
    InvalidState,
    ResyncRequired,
    StorageError,
    VmrError,
)

log = logging.getLogger("vmreplica.replica")
READ_AHEAD = 16 << 20  # bytes of a waiting delta read into memory (1.3 s at 100 Mbit/s)


class _ReadAhead:
    """A request body read ahead, up to ``limit`` bytes held, while its handler waits for its
    turn: the link goes on carrying it meanwhile."""

    def __init__(self, chunks: AsyncIterable[bytes], limit: int) -> None:
        self._held: collections.deque[bytes] = collections.deque()
        self._size, self._limit = 0, limit
        self._ended = False
        self._error: BaseException | None = None
        self._ready, self._room = asyncio.Event(), asyncio.Event()
        self._task = asyncio.ensure_future(self._fill(chunks))

    async def _fill(self, chunks: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in chunks:
                self._held.append(chunk)
                self._size += len(chunk)
                self._ready.set()
                while self._size >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        except Exception as e:  # the reader's to raise, where it reads
            self._error = e
        finally:
            self._ended = True
            self._ready.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            while not self._held:
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return
                self._ready.clear()
                await self._ready.wait()
            chunk = self._held.popleft()
            self._size -= len(chunk)
            self._room.set()
            yield chunk

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class Receiver:
    def __init__(
        self, ctx: Context, applier: Applier, recovery: ReplicaRecovery, media: MediaImport
    ) -> None:
        self._ctx = ctx
        self._applier = applier
        self._recovery = recovery
        self._media = media
        self._behind: set[asyncio.Task[None]] = set()  # applies running behind their answers

    async def receive(
        self,
        authz: Authorization,
        peer_names: list[str],
        vm_id: str,
        chunks: AsyncIterable[bytes],
        resume: tuple[int, int] | None = None,
    ) -> answers.SequenceAnswer:
        await redirect_if_elsewhere(self._ctx, vm_id)
        row = replica_row(self._ctx, vm_id)
        check_sender(self._ctx, row, authz, peer_names)
        ahead = resume is None and self._ctx.cluster is None
        if ahead and row.state == State.RESYNCHRONIZING:
            # A pipelined sender's next delta: read while the last one is finished.
            chunks = _ReadAhead(chunks, READ_AHEAD)
        try:
            async with self._ctx.locks.stream(vm_id):
                row = replica_row(self._ctx, vm_id)
                if ahead and row.state == State.RESYNCHRONIZING:
                    return await self._receive_ahead(row, chunks)
                async with self._ctx.locks.replica(vm_id), self._owner_writing(row):
                    return await self._receive_locked(vm_id, chunks, resume)
        finally:
            if isinstance(chunks, _ReadAhead):
                await chunks.close()

    async def _receive_locked(
        self, vm_id: str, chunks: AsyncIterable[bytes], resume: tuple[int, int] | None
    ) -> answers.SequenceAnswer:
        """Stage, journal and apply under the replica lock, then answer."""
        row = replica_row(self._ctx, vm_id)
        check_not_quarantined(self._ctx, row)
        if row.state in (State.FAILED_OVER_WAITING, State.FAILED_OVER):
            raise InvalidState(
                f"replica VM {row.vm_name} has failed over: it accepts no more changes"
            )
        queue = row.state == State.WAITING_FOR_INITIAL and row.initial_kind == OFFLINE
        if row.state == State.WAITING_FOR_INITIAL and not queue:
            raise InvalidState(
                f"replica VM {row.vm_name} is waiting for its initial copy, not for a delta"
            )
        if self._recovery.has_steps(vm_id):
            # A step an earlier request left unfinished: finish it before staging anew.
            await self._recovery.replay_or_quarantine(vm_id, "an unfinished step")
            row = replica_row(self._ctx, vm_id)
            check_not_quarantined(self._ctx, row)
        staging = staging_dir(row, row.sequence + 1)
        if resume is None:  # a whole stream: a cut one kept for resuming is not wanted
            shutil.rmtree(staging, ignore_errors=True)
        started = datetime.now(UTC)
        manifest = await self._stage(row, chunks, staging, resume, _checker(row, row.sequence))
        if queue:  # applied when the offline media is imported
            await self._media.queue(row, manifest.sequence, staging, started.isoformat())
            return answers.SequenceAnswer(manifest.sequence)
        # Again: the stream may have lasted longer than this node's lease.
        self._check_owner(vm_id)
        self._applier.journal(
            vm_id, manifest.sequence, staging, started.isoformat(),
            created=manifest.created, consistency=manifest.consistency,
        )  # fmt: skip
        faults.hit("replica.after_stage")
        await faults.ahit("replica.before_apply")  # sleep: a slow apply, the stage in place
        await self._recovery.apply(
            row, manifest.sequence, staging, started.isoformat(),
            consistency=manifest.consistency,
        )  # fmt: skip
        faults.hit("replica.after_apply_record")  # recorded here, not answered, not shared
        return answers.SequenceAnswer(manifest.sequence)

    async def _stage(
        self, row: ReplicationRow, chunks: AsyncIterable[bytes], staging: Path,
        resume: tuple[int, int] | None, check: wire.ManifestCheck,
    ) -> wire.DeltaManifest:  # fmt: skip
        """Receive and verify a delta into ``staging``; a refused one leaves nothing, a cut one
        stays as the point where the sender resumes."""
        try:
            manifest = await delta_receive.receive(
                chunks, staging, expected_vm_id=row.vm_id, check_manifest=check,
                resume=resume,
            )  # fmt: skip
            for i, chain in enumerate(chains(self._ctx, row)):
                await chain.check_incoming(disk_file(staging, i))
        except delta_receive.StreamCut:
            raise  # the stage stays, as the point where the sender resumes
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)  # a refused delta leaves nothing
            if isinstance(e, IntegrityError | ResyncRequired):
                self._ctx.events.record(
                    "delta-refused",
                    f"refused a delta for {row.vm_name}: {e.message}",
                    row.vm_name,
                    "warning",
                )
            raise
        return manifest

    async def _receive_ahead(
        self, row: ReplicationRow, chunks: AsyncIterable[bytes]
    ) -> answers.SequenceAnswer:
        """A resynchronization's delta: staged while the one before it may still be applying
        (the replica lock is not needed for that), then, under the lock (so after that apply),
        checked again, journaled and answered; its apply runs behind, holding the lock."""
        check_not_quarantined(self._ctx, row)
        applied = received_sequence(self._ctx, row)  # or journaled and being applied
        staging = staging_dir(row, applied + 1)
        shutil.rmtree(staging, ignore_errors=True)
        started = datetime.now(UTC).isoformat()
        manifest = await self._stage(row, chunks, staging, None, _ahead_checker(row, applied))
        lock = self._ctx.locks.replica(row.vm_id)
        await lock.acquire()
        journaled_now = False
        try:
            row = replica_row(self._ctx, row.vm_id)
            check_not_quarantined(self._ctx, row)
            if row.state != State.RESYNCHRONIZING:
                raise InvalidState(
                    f"replica VM {row.vm_name} is no longer being resynchronized (state "
                    f"{row.state}): delta {manifest.sequence} refused"
                )
            if self._recovery.has_steps(row.vm_id):
                await self._recovery.replay_or_quarantine(row.vm_id, "an unfinished step")
                row = replica_row(self._ctx, row.vm_id)
                check_not_quarantined(self._ctx, row)
            _checker(row, row.sequence)(manifest)  # exactly the next one, now the last is applied
            if not _whole(staging, manifest):  # a replay above clears the staging area
                raise StorageError(
                    f"delta {manifest.sequence} of {row.vm_name} was removed from the staging "
                    "area before it was journaled: send it again"
                )
            self._applier.journal(
                row.vm_id, manifest.sequence, staging, started,
                created=manifest.created, consistency=manifest.consistency,
            )  # fmt: skip
            journaled_now = True
            faults.hit("replica.after_stage")
            task = asyncio.create_task(self._apply_behind(lock, row, manifest, staging, started))
        except BaseException:
            lock.release()
            if not journaled_now:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._behind.add(task)  # the lock is the task's now: it releases it
        task.add_done_callback(self._behind.discard)
        return answers.SequenceAnswer(manifest.sequence)

    async def _apply_behind(
        self, lock: asyncio.Lock, row: ReplicationRow, manifest: wire.DeltaManifest,
        staging: Path, started: str,
    ) -> None:  # fmt: skip
        try:
            await faults.ahit("replica.apply_behind")
            await self._recovery.apply(
                row, manifest.sequence, staging, started, consistency=manifest.consistency
            )
        except Exception as e:  # the journal keeps it: the next delta, or a restart, finishes it
            reason = e.message if isinstance(e, VmrError) else repr(e)
            log.warning("applying delta %d of %s after its answer failed: %s",
                        manifest.sequence, row.vm_name, reason)  # fmt: skip
        finally:
            lock.release()

    def _check_owner(self, vm_id: str) -> None:
        """In a cluster, only the node that owns the VM under a valid lease writes into its
        replica storage (docs/CLUSTER.md, fencing); the primary keeps a refused delta."""
        if self._ctx.cluster is not None:
            self._ctx.cluster.check(vm_id, "apply a delta")

    @contextlib.asynccontextmanager
    async def _owner_writing(self, row: ReplicationRow) -> AsyncIterator[None]:
        """In a cluster: the VM's storage lock held for the whole stream and apply, and the
        ownership checked under it; after an apply, the facts written beside the chains
        (handoff.py) before the lock is released."""
        if self._ctx.cluster is None or not row.storage_dir:
            yield
            return
        async with self._ctx.cluster.writing(row.vm_id, Path(row.storage_dir), "apply a delta"):
            yield
            handoff.export(self._ctx, row.vm_id)


def _ahead_checker(row: ReplicationRow, applied: int) -> wire.ManifestCheck:
    """As :func:`_checker`, but a delta one further on is the pipelined next one of a sender
    whose last one did not make it: refused as such, not as a gap that needs a resync."""
    check = _checker(row, applied)

    def ahead(manifest: wire.DeltaManifest) -> None:
        if manifest.sequence == applied + 2:
            raise InvalidState(
                f"delta {manifest.sequence} of VM {row.vm_name} came before delta {applied + 1}: "
                "send that one first"
            )
        check(manifest)

    return ahead


def _whole(staging: Path, manifest: wire.DeltaManifest) -> bool:
    return (staging / wire.MANIFEST).exists() and all(
        disk_file(staging, d.index).exists() for d in manifest.disks
    )


def _checker(row: ReplicationRow, applied: int) -> wire.ManifestCheck:
    """The manifest must name this VM's every disk and the delta right after ``applied``."""
    expected, disks = applied + 1, list(range(len(row.disks)))

    def check(manifest: wire.DeltaManifest) -> None:
        name = f"delta {manifest.sequence} of VM {row.vm_name}"
        if manifest.sequence <= applied:
            raise IntegrityError(f"{name} was already applied: replayed delta refused")
        if manifest.sequence != expected:
            raise ResyncRequired(
                f"{name} is out of sequence (expected {expected}): a resynchronization is required"
            )
        if (named := [d.index for d in manifest.disks]) != disks:
            raise IntegrityError(
                f"{name} names disks {named}, but the replica VM has disks {disks}: every disk "
                "must be in it"
            )

    return check
