"""What ``replication get|measure|…`` show and do, whichever side of a relationship this host is.

The primary and replica sides do the work; this module turns their rows into the contract's
objects, computes health over the monitoring window, and sends each command to the right side.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmreplica._internal.engine import health
from vmreplica._internal.engine.authorization import AuthorizationService
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary import Primary
from vmreplica._internal.engine.replica import Replica
from vmreplica._internal.engine.server_settings import ServerService
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.models import Measurement, Replication
from vmreplica._internal.store.replications import COMPARED, CycleRow, ReplicationRow
from vmreplica.errors import InvalidArgument, InvalidState

WAIT_MAX = 10.0  # seconds a replication.get that waits for a change holds its request
WAIT_POLL = 0.02  # a row read in the agent, not a request

HEALTHS = ["Normal", "Warning", "Critical"]


class ReplicationService:
    def __init__(
        self,
        ctx: Context,
        server: ServerService,
        auth: AuthorizationService,
        vms: VmService,
        primary: Primary,
        replica: Replica,
    ) -> None:
        self._ctx = ctx
        self._config = ctx.config
        self._server = server
        self._auth = auth
        self._vms = vms
        self.primary = primary
        self.replica = replica
        self.store = ctx.stores.replications
        vms.replication_info = self.vm_columns
        vms.remove_guards.append(self._remove_guard)
        vms.disk_guards.append(self._disk_guard)
        vms.storage_roots = self._storage_roots

    def _storage_roots(self) -> list[Path]:
        settings = self._server.get()
        roots = [Path(e.replica_storage_location) for e in self._auth.auth_list()]
        if settings.default_storage_location:
            roots.append(Path(settings.default_storage_location))
        return roots

    def _disk_guard(self, disk: Path) -> None:
        """A VM's disk is never a file of replica storage: a chain image written from outside
        would corrupt every recovery point above it."""
        places = [Path(r.storage_dir) for r in self.store.all() if r.storage_dir]
        for place in [*places, *self._storage_roots()]:
            real = place.resolve()
            if disk == real or real in disk.parents:
                raise InvalidArgument(f"disk {disk} is in replica storage {place}")

    def _remove_guard(self, vm: VmRecord) -> None:
        if self.store.find(vm.id) is not None:
            raise InvalidState(
                f"VM {vm.name} is replicated: run `replication remove {vm.name}` first"
            )

    def _window(self, row: ReplicationRow, now: datetime) -> health.Window:
        settings = self._server.get()
        since = datetime.fromisoformat(row.stats_since)
        return health.monitoring_window(
            now, settings.monitoring_start_time, settings.monitoring_interval, since
        )

    def _health(
        self, row: ReplicationRow, now: datetime
    ) -> tuple[health.Health, health.Stats, health.Window]:
        window = self._window(row, now)
        since = window.start.astimezone(UTC).isoformat()
        stats = health.statistics(_cycles(self._ctx.stores.cycles.since(row.vm_id, since)), window)
        last = (
            datetime.fromisoformat(row.last_replication_time) if row.last_replication_time else None
        )
        verdict = health.evaluate(
            health.HealthInput(
                mode=row.mode,
                state=row.state,
                now=now,
                last_success=last,
                stats=stats,
                send_failure=row.send_failure,
                quarantine=row.quarantine,
                consistency_warning=row.consistency_warning,
            )
        )
        return verdict, stats, window

    def cycles(self, vm: str) -> list[dict[str, Any]]:
        """The cycles of the monitoring window, oldest first: what ``measure`` is computed from
        (the dashboard charts them)."""
        row = self._row(vm)
        now = datetime.now(UTC)
        window = self._window(row, now)
        since = window.start.astimezone(UTC).isoformat()
        return [
            {
                "start": c.start.isoformat(), "end": c.end.isoformat() if c.end else None,
                "size": c.size, "ok": c.ok, "missed": c.missed, "error": c.error,
                "latency_sec": (c.end - c.start).total_seconds() if c.end else None,
            }
            for c in self._ctx.stores.cycles.since(row.vm_id, since)
        ]  # fmt: skip

    def vm_columns(self, vm_id: str) -> tuple[str, str | None, str | None]:
        row = self.store.find(vm_id)
        if row is None:
            return State.DISABLED, None, None
        verdict, _, _ = self._health(row, datetime.now(UTC))
        return row.state, verdict.level, row.mode

    def to_model(self, row: ReplicationRow) -> Replication:
        verdict, _, _ = self._health(row, datetime.now(UTC))
        rec = self._vms.by_id(row.vm_id)
        disks = [str(rec.disks[i]) for i in row.disks if rec is not None and i < len(rec.disks)]
        s = row.settings
        return Replication(
            computer_name=self._config.name, vm_name=row.vm_name, vm_id=row.vm_id, state=row.state,
            health=verdict.level, mode=row.mode, relationship_type="Simple", primary_server=row.primary_server,
            replica_server=row.replica_server, replica_port=row.replica_port,
            authentication_type=row.authentication_type.capitalize(), frequency_sec=s.frequency_sec,
            recovery_history=s.recovery_history, snapshot_frequency_hour=s.snapshot_frequency_hour,
            compression_enabled=s.compression, replicated_disks=disks,
            auto_resynchronize_enabled=s.auto_resynchronize, trust_group=row.trust_group,
            last_replication_time=row.last_replication_time, initial_replication_progress=row.initial_progress,
            recovery_point_interval_sec=s.recovery_point_interval,
            resynchronization_progress=_resync_progress(row),
            wire_protection=wire_protection(row.authentication_type, s.encrypt),
            max_bandwidth_bps=s.max_bandwidth, bandwidth_schedule=s.bandwidth_schedule,
        )  # fmt: skip

    def get(
        self, vm: str | None, state: str | None, health_level: str | None, mode: str | None
    ) -> list[Replication]:
        for flag, value, known in (
            ("--state", state, [s.value for s in State]), ("--health", health_level, HEALTHS),
            ("--mode", mode, sorted(health.MODES)),
        ):  # fmt: skip
            if value is not None and value not in known:  # else an empty list, as if none were
                raise InvalidArgument(f"unknown {flag} {value!r}: one of {', '.join(known)}")
        rows = self.store.all()
        if vm is not None:
            rec = self._vms.find(vm)
            rows = [self.store.get(rec.id, vm)]
        models = [self.to_model(r) for r in rows]
        return [
            m for m in models
            if (state is None or m.state == state) and (health_level is None or m.health == health_level)
            and (mode is None or m.mode == mode)
        ]  # fmt: skip

    async def wait_while(self, vm: str, state: str, seconds: float) -> None:
        """Return once VM ``vm``'s state is no longer ``state``, or after ``seconds`` (at most
        ``WAIT_MAX``): a CLI that waits for a step to end learns it at once without asking ten
        times a second."""
        if state not in [s.value for s in State]:  # it would answer at once, as if it changed
            raise InvalidArgument(f"unknown state {state!r} to wait on")
        rec = self._vms.find(vm)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(seconds, 0.0), WAIT_MAX)
        while self.store.get(rec.id, vm).state == state and loop.time() < deadline:
            await asyncio.sleep(WAIT_POLL)

    def measure(self, vm: str | None) -> list[Measurement]:
        rows = self.store.all()
        if vm is not None:
            rec = self._vms.find(vm)
            rows = [self.store.get(rec.id, vm)]
        out = []
        now = datetime.now(UTC)
        for row in rows:
            verdict, stats, window = self._health(row, now)
            out.append(
                Measurement(
                    computer_name=self._config.name,
                    vm_name=row.vm_name,
                    state=row.state,
                    health=verdict.level,
                    health_details=verdict.details,
                    last_replication_time=row.last_replication_time,
                    last_replication_size=row.last_replication_size,
                    pending_replication_size=self.primary.pending.size(row.vm_id)
                    if row.mode == "Primary"
                    else 0,
                    average_replication_size=stats.average_replication_size,
                    maximum_replication_size=stats.maximum_replication_size,
                    average_replication_latency=stats.average_replication_latency,
                    maximum_replication_latency=stats.maximum_replication_latency,
                    successful_replication_count=stats.successful_replication_count,
                    missed_replication_count=stats.missed_replication_count,
                    replication_errors=stats.replication_errors,
                    initial_replication_size=row.initial_size,
                    monitoring_start_time=window.start.isoformat(timespec="seconds"),
                    monitoring_end_time=window.end.isoformat(timespec="seconds"),
                    resynchronization_progress=_resync_progress(row),
                )
            )
        return out

    def _row(self, vm: str) -> ReplicationRow:
        rec = self._vms.find(vm)
        return self.store.get(rec.id, vm)

    def _primary_only(self, vm: str, what: str) -> None:
        if self._row(vm).mode != "Primary":
            raise InvalidState(
                f"{what} runs on the primary server of {vm}; this host holds its replica"
            )

    async def suspend(self, vm: str) -> Replication:
        self._primary_only(vm, "suspend")
        return self.to_model(await self.primary.control.suspend(vm))

    async def resume(
        self, vm: str, resynchronize: bool, start_time: str | None = None, go_on: bool = False
    ) -> Replication:
        row = self._row(vm)
        if row.mode == "Replica" and not (resynchronize or go_on):
            return self.to_model(await self.replica.recovery.retry(self._vms.find(vm)))
        self._primary_only(vm, "resume")
        if start_time is not None and not resynchronize:
            raise InvalidArgument("--start-time goes with --resynchronize")
        if go_on:
            return self.to_model(await self.primary.resync.resume(vm))
        if resynchronize:
            return self.to_model(await self.primary.resync.request(vm, start_time))
        return self.to_model(await self.primary.control.resume(vm))

    async def stop(self, vm: str) -> Replication:
        """``replication stop``: cancel a resynchronization (the replica stays as it was)."""
        self._primary_only(vm, "stop")
        return self.to_model(await self.primary.resync.cancel(vm))

    async def stop_initial(self, vm: str) -> Replication:
        """``replication stop-initial``: whatever kind the initial replication is."""
        self._primary_only(vm, "stop-initial")
        row = self._row(vm)
        if row.initial_kind in COMPARED and row.state in (
            State.RESYNCHRONIZING, State.RESYNC_SUSPENDED,
        ):  # fmt: skip
            return self.to_model(await self.primary.resync.cancel(vm))
        return self.to_model(await self.primary.initial.stop(vm))

    async def reset_statistics(self, vm: str) -> Replication:
        row = self._row(vm)
        await self.primary.control.reset_statistics(row.vm_id)
        return self.to_model(self.store.get(row.vm_id, vm))

    async def remove(self, vm: str) -> Replication:
        row = self._row(vm)
        model = self.to_model(row)
        if row.mode == "Primary":
            await self.primary.control.remove(row)
        else:
            await self.replica.lifecycle.remove(row)
        return model


def _resync_progress(row: ReplicationRow) -> float | None:
    resyncing = row.state in (State.RESYNCHRONIZING, State.RESYNC_SUSPENDED)
    return row.resync_progress if resyncing else None


def _cycles(rows: list[CycleRow]) -> list[health.Cycle]:
    """Cycles as statistics count them: a late cycle also stands for the periods it skipped,
    each one missed."""
    out: list[health.Cycle] = []
    for r in rows:
        out.append(health.Cycle(r.start, r.end, r.size, r.ok, missed=False, error=r.error))
        out += [health.Cycle(r.start, None, 0, False, missed=True) for _ in range(r.missed)]
    return out


def wire_protection(authentication_type: str, encrypt: bool) -> str:
    if authentication_type != "kerberos":
        return "tls"
    return "gss-wrap" if encrypt else "gss-mic"
