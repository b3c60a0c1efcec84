"""The primary's scheduler: one task per replicated VM that runs its initial copy, then a cycle
every ``frequency_sec`` on a fixed grid. Periods that pass while a cycle is still busy are
missed, and are counted with the next cycle (engine/health.py's ``after_cycle``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.health import after_cycle
from vmreplica._internal.engine.primary.failures import record_failure
from vmreplica._internal.engine.states import State
from vmreplica._internal.store.replications import ReplicationRow

InitialJob = Callable[[ReplicationRow], Awaitable[None]]
CycleJob = Callable[[str, datetime, int], Awaitable[None]]
ResyncJob = Callable[[ReplicationRow], Awaitable[None]]
ResyncDue = Callable[[ReplicationRow, datetime], bool]
ResyncBegin = Callable[[ReplicationRow, str], None]
InitialBegin = Callable[[ReplicationRow], None]

RESYNC_RETRY = timedelta(seconds=15)


class Scheduler:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._initial: InitialJob | None = None
        self._cycle: CycleJob | None = None
        self._begin_initial: InitialBegin | None = None
        self._resync: tuple[ResyncJob, ResyncDue, ResyncBegin] | None = None

    def set_jobs(self, initial: InitialJob, cycle: CycleJob, begin_initial: InitialBegin) -> None:
        self._initial, self._cycle, self._begin_initial = initial, cycle, begin_initial

    def set_resync(self, job: ResyncJob, due: ResyncDue, begin: ResyncBegin) -> None:
        self._resync = (job, due, begin)

    def run(self, vm_id: str) -> None:
        """Start the VM's task if it does not run, and have it act now."""
        task = self._tasks.get(vm_id)
        if task is None or task.done():
            self._wake[vm_id] = asyncio.Event()
            self._tasks[vm_id] = asyncio.create_task(
                self._loop(vm_id), name=f"replicate-{vm_id[:8]}"
            )
        else:
            self.kick(vm_id)

    def kick(self, vm_id: str) -> None:
        """Wake the VM's task, if it runs: a setting changed, or replication resumed."""
        event = self._wake.get(vm_id)
        if event is not None:
            event.set()

    async def _loop(self, vm_id: str) -> None:
        assert self._initial is not None and self._cycle is not None
        assert self._begin_initial is not None
        assert self._resync is not None
        resync, resync_due, begin_resync = self._resync
        due = datetime.now(UTC)
        missed = 0
        while True:
            row = self._ctx.stores.replications.find(vm_id)
            if row is None or row.mode != "Primary":
                return
            started = datetime.now(UTC)
            scheduled = _initial_at(row)
            if scheduled is not None and scheduled <= started:
                self._begin_initial(row)  # start-initial --start-time: its time has come
                continue
            if resync_due(row, started):
                why = "started at its scheduled time" if row.resync_at else "started automatically"
                begin_resync(row, why + " (auto-resynchronize window)" * (not row.resync_at))
                continue
            try:
                if row.state == State.INITIAL_IN_PROGRESS:
                    await self._initial(row)
                elif row.state == State.REPLICATING:
                    await self._cycle(row.vm_id, started, missed)
                elif row.state == State.RESYNCHRONIZING:
                    await resync(row)
                    continue  # finished: the first cycle runs at once, or it was suspended
            except asyncio.CancelledError:
                raise
            except Exception as e:
                record_failure(self._ctx, row, started, e, missed)
            finished = datetime.now(UTC)
            due, missed = after_cycle(due, finished, row.settings.frequency_sec)
            if row.state != State.REPLICATING:
                missed = 0
            if row.resync_at is not None and row.state == State.WAITING_FOR_RESYNC:
                due = min(due, datetime.fromisoformat(row.resync_at))
            if scheduled is not None:
                due = min(due, scheduled)
            if row.state == State.RESYNCHRONIZING:
                # Failed: nothing replicates until it ends, so it goes on from its saved
                # position soon rather than a whole interval later.
                due = min(due, finished + RESYNC_RETRY)
            wake = self._wake.setdefault(vm_id, asyncio.Event())
            try:
                await asyncio.wait_for(
                    wake.wait(), max(0.0, (due - datetime.now(UTC)).total_seconds())
                )
                due = datetime.now(UTC)  # woken early (resume, settings): a new grid from now
            except TimeoutError:
                pass
            wake.clear()

    async def stop_vm(self, vm_id: str) -> None:
        task = self._tasks.pop(vm_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def start(self) -> None:
        for row in self._ctx.stores.replications.all():
            if (
                row.mode == "Primary"
                and row.state
                in (
                    State.INITIAL_IN_PROGRESS,
                    State.REPLICATING,
                    State.RESYNCHRONIZING,
                    State.WAITING_FOR_RESYNC,  # for a scheduled or automatic resynchronization
                )
            ) or _initial_at(row) is not None:
                self.run(row.vm_id)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def _initial_at(row: ReplicationRow) -> datetime | None:
    """When a scheduled initial replication is to start, if one is."""
    if row.state != State.READY_FOR_INITIAL or row.initial_at is None:
        return None
    return datetime.fromisoformat(row.initial_at)
