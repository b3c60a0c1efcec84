"""Initial replication on the primary: a full copy of every replicated disk, with change tracking
starting at the same instant.

The data does not go through the HTTPS stream: the replica opens an import for it (initial-open)
and the driver copies a point-in-time view of the disks straight into it (for QEMU: NBD with TLS
from a fleecing export into the replica's new base images). initial-close then has the replica
adopt the images as its chains' base. A copy that fails or is interrupted is started over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from vmreplica._internal import faults
from vmreplica._internal.engine.connect import peer_address
from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import DiskOwner
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import Peer, open_peer
from vmreplica.errors import InvalidState, VmrError

log = logging.getLogger("vmreplica.primary")


class InitialReplication:
    def __init__(
        self, ctx: Context, vms: VmService, pending: PendingLog, run: Callable[[str], None]
    ) -> None:
        self._ctx = ctx
        self._vms = vms
        self._pending = pending
        self._run = run  # the scheduler's: start (or wake) the VM's replication task
        self._store = ctx.stores.replications

    async def start(self, name: str) -> ReplicationRow:
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        if row.mode != "Primary":
            raise InvalidState(
                f"VM {name} is a replica here: start initial replication on its primary server"
            )
        if row.state == State.INITIAL_IN_PROGRESS:
            # A copy that failed waits for the schedule to retry it: start it again now.
            with self._ctx.stores.db.tx() as tx:
                move(self._ctx, tx, row, Command.RETRY_INITIAL, send_failure=None, last_error=None)
            self._run(rec.id)
            return self._store.get(rec.id, name)
        allows(row, Command.START_INITIAL)
        with self._ctx.stores.db.tx() as tx:
            move(self._ctx, tx, row, Command.START_INITIAL, initial_progress=0.0, last_error=None)
            self._ctx.events.record(
                "initial-replication-started", f"initial replication of {name} started", name,
                tx=tx,
            )  # fmt: skip
        self._run(rec.id)
        return self._store.get(rec.id, name)

    async def run(self, row: ReplicationRow) -> None:
        """Copy every replicated disk and record the relationship as replicating."""
        started = datetime.now(UTC)
        peer = peer_address(self._ctx.config, row.replica_server, row.replica_port)
        async with open_peer(peer, self._ctx.config.tls, timeout=120.0) as replica:
            status = await replica.status(p.StatusRequest(row.vm_id))
            if status.sequence >= 1:
                # The replica adopted the copy before a crash lost its acknowledgement here. The
                # tracking of generation 1 started when that copy began; settle() checks it.
                size = row.initial_size or 0
            else:
                size = await self._copy(row, replica)
        now = now_iso()
        with self._ctx.stores.db.tx() as tx:
            move(
                self._ctx, tx, self._store.get(row.vm_id, row.vm_name), Command.FINISH_INITIAL,
                sequence=1, generation=1, acked_sequence=1, initial_progress=100.0,
                initial_size=size, last_replication_time=now, last_replication_size=size,
                send_failure=None, last_error=None,
            )  # fmt: skip
            self._ctx.stores.cycles.record(tx, row.vm_id, started.isoformat(), True, 1, size, 0)
            self._ctx.events.record(
                "initial-replication-done",
                f"initial replication of {row.vm_name} done ({size} bytes)",
                row.vm_name,
                tx=tx,
            )
        self._pending.clear(row.vm_id)

    async def _copy(self, row: ReplicationRow, replica: Peer) -> int:
        rec = self._vms.find(row.vm_name)
        driver, tls = self._ctx.driver, self._ctx.config.tls
        address = replica.address
        disks = [rec.disks[i] for i in row.disks]
        run_dir = self._vms.run_dir(rec.id)
        progress = self._progress(row, [await driver.virtual_size(d) for d in disks])
        marks = [time.monotonic()]
        required = sum([await driver.required_size(d) for d in disks])
        # The replica prepares its images while tracking starts here.
        opening = asyncio.ensure_future(
            replica.initial_open(p.InitialOpenRequest(row.vm_id, required))
        )
        closed = False
        try:
            async with self._ctx.locks.vm(rec.id):  # an off VM stays off while it is read
                owner = DiskOwner(
                    rec.name, rec.disks, row.disks, run_dir, self._vms.runtime.process(rec.id)
                )
                async with driver.point_in_time(owner, generation=1) as source:
                    await faults.ahit("primary.before_initial_copy")
                    opened = await opening
                    marks.append(time.monotonic())
                    if len(opened.exports) != len(disks):
                        raise InvalidState(
                            f"the replica offers {len(opened.exports)} disks, {row.vm_name} has "
                            f"{len(disks)}"
                        )
                    for disk, export in enumerate(opened.exports):
                        await driver.copy_to(
                            source, disk, address.address, opened.port, export, tls,
                            address.fqdn, run_dir, functools.partial(progress, disk),
                        )  # fmt: skip
                    marks.append(time.monotonic())
            faults.hit("primary.after_initial_copy")
            answer = await replica.initial_close(p.InitialCloseRequest(row.vm_id, ok=True))
            closed = True
            marks.append(time.monotonic())
            prepare, copy, finish = (b - a for a, b in itertools.pairwise(marks))
            log.info(
                "initial copy of %s: prepare %.2f s, copy %.2f s, finish %.2f s",
                row.vm_name, prepare, copy, finish,
            )  # fmt: skip
            return answer.size
        finally:
            if not opening.done():
                opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            if not closed:
                # Even when the open was cut short here: the replica may have finished it, and
                # its lock on the VM puts this close after the open.
                with contextlib.suppress(VmrError):
                    await replica.initial_close(p.InitialCloseRequest(row.vm_id, ok=False))

    def _progress(self, row: ReplicationRow, sizes: list[int]) -> Callable[[int, float], None]:
        """Per-disk percentages in, the VM's weighted percentage stored (at most twice a second)."""
        weights = [s / (sum(sizes) or 1) for s in sizes]
        done = [0.0] * len(sizes)
        last = [0.0]

        def progress(disk: int, percent: float) -> None:
            done[disk] = percent
            now = time.monotonic()
            if now - last[0] > 0.5:
                last[0] = now
                total = sum(w * d for w, d in zip(weights, done, strict=True))
                self._store.update(row.vm_id, initial_progress=round(min(total, 99.0), 1))

        return progress
