"""The replica side of replication, one module per operation: a replica VM's life
(:mod:`.enable`), the initial copy (:mod:`.initial`), deltas received (:mod:`.receive`) and
applied (:mod:`.apply`), recovery points (:mod:`.points`), and recovery of interrupted steps
(:mod:`.recovery`), a copy already here as the start of a replica (:mod:`.seed`), and offline media (:mod:`.media`). :func:`build` wires them together."""

from __future__ import annotations

import dataclasses

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.enable import ReplicaLifecycle
from vmreplica._internal.engine.replica.initial import InitialImport
from vmreplica._internal.engine.replica.media import MediaImport
from vmreplica._internal.engine.replica.points import RecoveryPoints
from vmreplica._internal.engine.replica.receive import Receiver
from vmreplica._internal.engine.replica.recovery import ReplicaRecovery
from vmreplica._internal.engine.replica.resync import ReplicaResync
from vmreplica._internal.engine.replica.seed import Seeds
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import ImportTarget


@dataclasses.dataclass(frozen=True)
class Replica:
    lifecycle: ReplicaLifecycle
    initial: InitialImport
    receiver: Receiver
    points: RecoveryPoints
    recovery: ReplicaRecovery
    resync: ReplicaResync
    seeds: Seeds
    media: MediaImport


def build(ctx: Context, vms: VmService) -> Replica:
    imports: dict[str, tuple[ImportTarget, str]] = {}
    applier = Applier(ctx)
    points = RecoveryPoints(ctx)
    resync = ReplicaResync(ctx, points)
    recovery = ReplicaRecovery(ctx, applier, points, resync, imports)
    resync.finish_steps = recovery.replay_or_quarantine
    initial = InitialImport(ctx, vms, applier, recovery, imports)
    seeds = Seeds(ctx, vms)
    media = MediaImport(ctx, vms, applier, recovery)
    lifecycle = ReplicaLifecycle(ctx, vms, initial, seeds)
    vms.runtime.start_guards.append(lifecycle.start_guard)
    vms.definition_of = lifecycle.definition_of
    return Replica(
        lifecycle=lifecycle, initial=initial, receiver=Receiver(ctx, applier, recovery, media),
        points=points, recovery=recovery, resync=resync, seeds=seeds, media=media,
    )  # fmt: skip


__all__ = ["Replica", "build"]
