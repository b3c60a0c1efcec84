"""High availability of a replica cluster's VMs (docs/CLUSTER.md): what a node does when it
takes a replica over, when it loses its lease, and for a failed-over VM that must run.

- **Exactly once across a takeover.** The owner records the delta it is applying in
  `step.json` beside the chains (after its journal entry, before the first write to a chain;
  `handoff.write_step`). A node taking the VM over whose imported facts stop one sequence
  short of that step finishes the apply from the shared stage (the stage is whole: it was
  verified before the step was written, and its disk files disappear only as each one is
  committed), records the sequence, and writes the facts again. The primary, whose delta was
  never answered, learns the sequence from STATUS and drops it instead of sending it again.
- **A failed-over replica VM that runs is highly available.** While it runs, the file
  `vm-runs` lies beside its chains; it goes when the VM goes off by the operator's or the
  guest's will (not when the node dies, nor when fencing kills it). The owner starts an owned,
  failed-over VM whose `vm-runs` is there and that is not running: after a takeover, or after
  its own fencing once its lease is back. A start that fails (the image still locked by a
  former owner's QEMU) is tried again.
- **Fencing stops the VMs.** At its local deadline (`Fence`: 2/3 of the TTL after the last
  answered keepalive, before etcd can expire the lease and another node can take over), a
  node kills every failed-over replica VM it runs, without waiting for the keepalive loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.apply import Applier
from vmreplica._internal.engine.replica.common import REPLICA, chains, staging_dir
from vmreplica._internal.engine.replica.points import STANDARD, RecoveryPoints
from vmreplica._internal.engine.replica.recovery import ReplicaRecovery
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.cluster")

RUNS_FILE = "vm-runs"
FAILED_OVER = (State.FAILED_OVER_WAITING, State.FAILED_OVER)
RETRY = 5.0  # seconds between two starts of the same VM that failed
TICK = 0.5  # the guard's longest sleep


class ReplicaHa:
    def __init__(
        self, ctx: Context, vms: VmService, recovery: ReplicaRecovery,
        owned: Callable[[], Collection[str]], remaining: Callable[[], float],
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._recovery = recovery
        self._applier = Applier(ctx)
        self._points = RecoveryPoints(ctx)
        self._owned = owned
        self._remaining = remaining  # seconds this node's lease is valid for (0: fenced)
        self._killing: set[str] = set()
        self._tried: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        vms.runtime.start_guards.append(self._start_guard)
        vms.runtime.on_started.append(self._started)
        vms.runtime.on_off.append(self._off)

    # -- the files beside the chains -----------------------------------------------------

    def _row(self, vm_id: str) -> ReplicationRow | None:
        row = self._ctx.stores.replications.find(vm_id)
        if row is None or row.mode != REPLICA or not row.storage_dir:
            return None
        return row

    def _start_guard(self, rec: VmRecord) -> None:
        """Only the owner runs a failed-over replica VM (the check raises otherwise)."""
        row = self._row(rec.id)
        if row is not None and row.state in FAILED_OVER and self._ctx.cluster is not None:
            self._ctx.cluster.check(rec.id, f"start VM {rec.name}")

    def _started(self, rec: VmRecord) -> None:
        row = self._row(rec.id)
        if row is not None and row.state in FAILED_OVER:
            path = Path(str(row.storage_dir)) / RUNS_FILE
            try:
                path.write_text(self._ctx.host)
            except OSError as e:
                log.warning("cannot write %s: %s", path, e)

    def _off(self, rec: VmRecord, clean: bool) -> None:
        if rec.id in self._killing or rec.id not in self._owned() or self._remaining() <= 0:
            # Fenced, or found dead at a restart (this node died; another may run it now):
            # the VM must run on, on its owner.
            return
        row = self._row(rec.id)
        if row is not None:
            with contextlib.suppress(OSError):
                (Path(str(row.storage_dir)) / RUNS_FILE).unlink(missing_ok=True)

    # -- taking a VM over ----------------------------------------------------------------

    async def acquired(self, vm_id: str, storage: Path) -> None:
        """The agent's `on_acquired`: import the facts, finish a half-recorded apply or
        failover completion, and start the VM if it must run."""
        if not await handoff.take_over(self._ctx, self._vms, vm_id, storage):
            return
        await self.finish_step(vm_id, storage)
        await self.finish_freeze(vm_id, storage)
        # A `failover complete` the former owner began (adopted by take_over): finished here.
        await self._ctx.journal.recover(handoff.COMPLETE_KIND, subject=vm_id)
        self._tried.pop(vm_id, None)
        await self._ensure_running(vm_id)

    async def finish_step(self, vm_id: str, storage: Path) -> bool:
        """The dead owner's step, if the facts stop one short of it: finish it here."""
        step = handoff.read_step(storage)
        row = self._row(vm_id)
        if step is None or row is None or row.state in FAILED_OVER:
            return False
        sequence = int(step.get("sequence", 0))
        staging = staging_dir(row, sequence)
        if sequence != row.sequence + 1 or Path(str(step.get("staging"))) != staging:
            return False  # recorded already (or not this chain's next one)
        cluster = self._ctx.cluster
        assert cluster is not None
        extra: dict[str, Any] = {k: step[k] for k in ("created", "consistency") if k in step}
        async with self._ctx.locks.replica(vm_id), cluster.writing(vm_id, storage, "apply"):
            row = self._row(vm_id)
            if row is None or row.sequence + 1 != sequence:
                return False
            started = str(step.get("started", ""))
            self._applier.journal(vm_id, sequence, staging, started, **extra)
            await self._recovery.apply(
                row, sequence, staging, started,
                consistency=str(extra.get("consistency", "CrashConsistent")),
            )  # fmt: skip
            handoff.export(self._ctx, vm_id)
        self._ctx.events.record(
            "replica-apply-finished",
            f"finished applying delta {sequence} of {row.vm_name}, which its former owner had "
            "begun: the primary does not send it again",
            row.vm_name,
        )
        return True

    async def finish_freeze(self, vm_id: str, storage: Path) -> bool:
        """A point the dead owner was freezing (`rp-<id>` on top of a chain, the facts not
        listing it): finished and recorded here. Left alone, `tip` stands on it unlisted, the
        next freeze of that id finds it made already and leaves this node's deltas out."""
        row = self._row(vm_id)
        if row is None or row.state in FAILED_OVER:
            return False
        known = set(self._ctx.stores.points.ids(vm_id))
        found = {i for chain in chains(self._ctx, row) for i in chain.point_ids()}
        begun = sorted(i for i in found - known if i >= row.next_rp_id)
        if not begun:
            return False
        cluster = self._ctx.cluster
        assert cluster is not None
        async with self._ctx.locks.replica(vm_id), cluster.writing(vm_id, storage, "freeze"):
            for point in begun:
                # Its data are this node's first: nothing was applied here yet.
                await self._points.finish_freeze(
                    self._row(vm_id) or row, point, STANDARD, now_iso()
                )
            handoff.export(self._ctx, vm_id)
        return True

    # -- running and fencing ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._guard(), name="cluster-ha-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _guard(self) -> None:
        """Wake at the lease's deadline (or every TICK): fenced, kill; owner, keep running."""
        while True:
            await asyncio.sleep(max(min(self._remaining() or TICK, TICK), 0.05))
            try:
                if self._remaining() <= 0:
                    await self.fenced()
                else:
                    for vm_id in sorted(self._owned()):
                        await self._ensure_running(vm_id)
            except Exception:
                log.exception("cluster HA pass failed")

    async def fenced(self) -> None:
        """This node holds no valid lease: kill every failed-over replica VM it runs, at once
        (no clean shutdown: the next owner may start it from the same images soon)."""
        for row in self._ctx.stores.replications.all():
            process = self._vms.runtime.process(row.vm_id)
            if row.mode != REPLICA or row.state not in FAILED_OVER or process is None:
                continue
            self._killing.add(row.vm_id)
            try:
                why = f"killed: node {self._ctx.host} lost its cluster lease"
                await self._vms.runtime.kill(row.vm_id, why)
            finally:
                self._killing.discard(row.vm_id)
            self._ctx.events.record(
                "cluster-fenced-vm-stopped",
                f"VM {row.vm_name} killed: node {self._ctx.host} lost its cluster lease, and "
                "the node that takes the VM over starts it",
                row.vm_name,
                "warning",
            )

    async def _ensure_running(self, vm_id: str) -> None:
        row = self._row(vm_id)
        if row is None or row.state not in FAILED_OVER:
            return
        if not (Path(str(row.storage_dir)) / RUNS_FILE).exists():
            return
        rec = self._vms.by_id(vm_id)
        if rec is None or self._vms.runtime.process(vm_id) is not None:
            return
        if time.monotonic() < self._tried.get(vm_id, 0.0) + RETRY:
            return
        self._tried[vm_id] = time.monotonic()
        try:
            await self._vms.runtime.start(rec.name)
        except VmrError as e:
            self._ctx.events.record(
                "cluster-vm-start-failed",
                f"cannot start VM {rec.name}, which must run: {e.message} (tried again)",
                rec.name,
                "warning",
            )
            return
        self._ctx.events.record(
            "cluster-vm-restarted",
            f"started VM {rec.name} on node {self._ctx.host}: it ran on the node that owned it "
            "before",
            rec.name,
        )
