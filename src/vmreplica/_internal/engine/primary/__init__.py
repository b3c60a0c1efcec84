"""The primary side of replication, one module per operation: enabling (:mod:`.enable`), the
initial copy (:mod:`.initial`), cycles (:mod:`.cycle`) that fill the pending log
(:mod:`.pending`), sending it (:mod:`.sender`), the schedule (:mod:`.scheduler`), and the
operator's controls (:mod:`.control`). :func:`build` wires them together."""

from __future__ import annotations

import dataclasses

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary.attach import Attach
from vmreplica._internal.engine.primary.consistency import AppConsistency
from vmreplica._internal.engine.primary.control import PrimaryControl
from vmreplica._internal.engine.primary.cycle import Cycles
from vmreplica._internal.engine.primary.enable import PrimaryEnable
from vmreplica._internal.engine.primary.initial import InitialReplication
from vmreplica._internal.engine.primary.move import VmMove
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.resync import Resync
from vmreplica._internal.engine.primary.scheduler import Scheduler
from vmreplica._internal.engine.primary.sender import Sender
from vmreplica._internal.engine.primary.throttle import Throttle
from vmreplica._internal.engine.vms import VmService


@dataclasses.dataclass(frozen=True)
class Primary:
    enable: PrimaryEnable
    initial: InitialReplication
    cycles: Cycles
    sender: Sender
    control: PrimaryControl
    scheduler: Scheduler
    pending: PendingLog
    resync: Resync
    move: VmMove  # `vm move` in a cluster: the source's side
    attach: Attach  # and the target's


def build(ctx: Context, vms: VmService) -> Primary:
    pending = PendingLog(ctx.config)
    scheduler = Scheduler(ctx)
    throttle = Throttle(ctx)
    sender = Sender(ctx, pending, throttle)
    cycles = Cycles(ctx, vms, pending, sender, AppConsistency(ctx, vms))
    initial = InitialReplication(ctx, vms, pending, scheduler.run, scheduler.stop_vm, throttle)
    scheduler.set_jobs(initial.run, cycles.cycle, initial.start_scheduled)
    resync = Resync(ctx, vms, pending, sender, scheduler.run, scheduler.stop_vm)
    scheduler.set_resync(resync.run, resync.due, resync.begin)
    control = PrimaryControl(ctx, vms, pending, scheduler, resync)
    vms.runtime.on_off.append(control.on_vm_off)
    return Primary(
        enable=PrimaryEnable(ctx, vms, scheduler.kick), initial=initial, cycles=cycles,
        sender=sender, control=control, scheduler=scheduler, pending=pending, resync=resync,
        move=VmMove(ctx, vms, cycles, pending, scheduler), attach=Attach(ctx, vms, scheduler),
    )  # fmt: skip


__all__ = ["Primary", "build"]
