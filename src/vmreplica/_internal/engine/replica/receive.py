"""Receiving deltas on the replica.

A delta is refused before a byte is stored when the sender is not the server that created the
replica VM and not in its trust group, or when its sequence number is not exactly the next one;
once staged, it is refused (and removed) unless every disk of the VM is in it as a standalone
qcow2 of the disk's size. Only then is it journaled and applied (replica/recovery.py).
"""

from __future__ import annotations

import contextlib
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
from vmreplica.errors import IntegrityError, InvalidState, ResyncRequired


class Receiver:
    def __init__(
        self, ctx: Context, applier: Applier, recovery: ReplicaRecovery, media: MediaImport
    ) -> None:
        self._ctx = ctx
        self._applier = applier
        self._recovery = recovery
        self._media = media

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
        async with self._ctx.locks.replica(vm_id), self._owner_writing(row):
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
            try:
                manifest = await delta_receive.receive(
                    chunks, staging, expected_vm_id=vm_id, check_manifest=_checker(row),
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
            await self._recovery.apply(
                row, manifest.sequence, staging, started.isoformat(),
                consistency=manifest.consistency,
            )  # fmt: skip
            faults.hit("replica.after_apply_record")  # recorded here, not answered, not shared
            return answers.SequenceAnswer(manifest.sequence)

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


def _checker(row: ReplicationRow) -> wire.ManifestCheck:
    expected, disks = row.sequence + 1, list(range(len(row.disks)))

    def check(manifest: wire.DeltaManifest) -> None:
        name = f"delta {manifest.sequence} of VM {row.vm_name}"
        if manifest.sequence <= row.sequence:
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
