"""Application-consistent recovery points (Hyper-V's VSS snapshot frequency).

Every ``--snapshot-frequency`` hours a cycle asks the guest, through its guest agent, to flush and
freeze its file systems, cuts the delta, and thaws: the delta then holds what the applications
flushed, and the replica makes it a recovery point of kind ApplicationConsistent. The guest is
thawed right after the cut, on any error, and in any case at most :data:`THAW_LIMIT` seconds after
the freeze (a timer); a delta cut after that timer fired is only crash-consistent. The freeze is
journaled (``fsfreeze``) before it is asked for, so an agent killed while the guest is frozen
thaws it when it starts again.

A guest without an agent that answers gets crash-consistent points, and the relationship's
health shows a Warning that says why, until an attempt succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import GuestAgentUnavailable, VmProcess
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.primary")

FREEZE_TIMEOUT = 10.0  # for the guest to flush and freeze
THAW_LIMIT = 10.0  # the longest a guest stays frozen for a cycle
THAW_TIMEOUT = 5.0


@dataclass
class Freeze:
    row: ReplicationRow
    process: VmProcess
    frozen_at: float
    filesystems: int
    entry: int
    timer: asyncio.Task[None] | None = None
    thawed_at: float | None = None
    by_timer: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def seconds(self) -> float:
        return (self.thawed_at or time.monotonic()) - self.frozen_at


class AppConsistency:
    def __init__(self, ctx: Context, vms: VmService) -> None:
        self._ctx = ctx
        self._vms = vms
        ctx.journal.register("fsfreeze", self._recover)

    def due(self, row: ReplicationRow, now: datetime) -> bool:
        hours = row.settings.snapshot_frequency_hour
        if not hours:
            return False
        if row.app_consistent_at is None:
            return True
        return now - datetime.fromisoformat(row.app_consistent_at) >= timedelta(hours=hours)

    async def freeze(self, row: ReplicationRow, process: VmProcess) -> Freeze | None:
        """Freeze the guest's file systems; None (and the reason recorded) when it cannot."""
        with self._ctx.stores.db.tx() as tx:
            entry = self._ctx.journal.begin(tx, "fsfreeze", row.vm_id, {"vm": row.vm_name})
        started = time.monotonic()
        try:
            count = await process.freeze_filesystems(FREEZE_TIMEOUT)
        except VmrError as e:
            if not isinstance(e, GuestAgentUnavailable):  # it may have frozen some
                with contextlib.suppress(VmrError):
                    await process.thaw_filesystems(THAW_TIMEOUT)
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.end_entry(tx, entry)
            self._not_consistent(row, e.message)
            return None
        freeze = Freeze(row, process, time.monotonic(), count, entry)
        freeze.timer = asyncio.create_task(self._thaw_later(freeze), name="thaw-limit")
        log.info("froze %d file system(s) of %s in %.3f s", count, row.vm_name,
                 freeze.frozen_at - started)  # fmt: skip
        await faults.ahit("primary.while_frozen")
        return freeze

    async def thaw(self, freeze: Freeze) -> bool:
        """Thaw (once); whether everything since the freeze happened while still frozen."""
        async with freeze.lock:
            if freeze.thawed_at is None:
                if freeze.timer is not None and asyncio.current_task() is not freeze.timer:
                    freeze.timer.cancel()
                try:
                    await freeze.process.thaw_filesystems(THAW_TIMEOUT)
                except VmrError as e:
                    # Left journaled: the next start of the agent thaws it.
                    log.error("thawing %s failed: %s", freeze.row.vm_name, e)
                    self._ctx.events.record(
                        "thaw-failed", f"thawing the file systems of {freeze.row.vm_name} "
                        f"failed: {e.message}", freeze.row.vm_name, "error",
                    )  # fmt: skip
                    return False
                freeze.thawed_at = time.monotonic()
                with self._ctx.stores.db.tx() as tx:
                    self._ctx.journal.end_entry(tx, freeze.entry)
                log.info("thawed %s: frozen %.3f s%s", freeze.row.vm_name, freeze.seconds,
                         " (time limit)" if freeze.by_timer else "")  # fmt: skip
        return not freeze.by_timer

    def done(self, row: ReplicationRow, consistent: bool, freeze: Freeze | None) -> None:
        """Record an attempt that got as far as a delta."""
        if consistent and freeze is not None:
            self._ctx.stores.replications.update(
                row.vm_id, app_consistent_at=now_iso(), consistency_warning=None
            )
            self._ctx.events.record(
                "application-consistent",
                f"application-consistent delta of {row.vm_name}: {freeze.filesystems} file "
                f"system(s) frozen for {freeze.seconds:.3f} s",
                row.vm_name,
            )
        elif freeze is not None:
            self._not_consistent(
                row, f"the cut took longer than the {THAW_LIMIT:.0f} s a guest may stay frozen"
            )

    def _not_consistent(self, row: ReplicationRow, why: str) -> None:
        self._ctx.stores.replications.update(
            row.vm_id, app_consistent_at=now_iso(), consistency_warning=why
        )
        self._ctx.events.record(
            "application-consistency-failed",
            f"the recovery point of {row.vm_name} is crash-consistent only: {why}",
            row.vm_name,
            "warning",
        )

    async def _thaw_later(self, freeze: Freeze) -> None:
        await asyncio.sleep(THAW_LIMIT)
        freeze.by_timer = True
        await self.thaw(freeze)

    async def _recover(self, entry: JournalEntry) -> None:
        """The agent stopped while a guest was frozen: thaw it, if it still runs."""
        process = self._vms.runtime.process(entry.subject)
        if process is not None:
            try:
                await process.thaw_filesystems(THAW_TIMEOUT)
            except VmrError as e:
                log.warning("thawing %s after a restart failed: %s", entry.data.get("vm"), e)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end_entry(tx, entry.id)
        self._ctx.events.record(
            "recovered",
            f"thawed the file systems of {entry.data.get('vm')}, frozen when the agent stopped",
            str(entry.data.get("vm")),
        )
