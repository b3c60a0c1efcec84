"""`vm move`: a primary VM changes nodes within its cluster (docs/CLUSTER.md, the primary side).

The nodes of a primary cluster share the storage that holds the VMs' disks (qcow2: the change
tracking's bitmaps live in them and move with them). A VM is owned by one node (`owners/<vm>`,
as a replica is) and only that node runs and replicates it. A move is cold:

1. the source stops its schedule, stops the VM (ACPI, or at once with `--force`) and cuts and
   sends a last delta, so that its pending log is empty and its storage daemon closed;
2. it writes the VM's facts (its definition, its replication row, whether it ran) beside its
   first disk (`.vmreplica-<id>.json`, atomically), [fault point `vm.move.after_export`];
3. it gives the VM to the target in one etcd txn (`move`), [`vm.move.after_handover`];
4. it forgets the VM (rows, pending log) and waits for the target to attach it;
5. the target, on acquiring the VM (`attach.acquired`), imports the facts, starts the VM if it
   ran and resumes the schedule: the next cycle is a DELTA from the generation the bitmaps hold.

Journaled (`vm-move`, on the source). Recovered after the node joined its cluster again: if
etcd says the target owns the VM, the move is finished (the source forgets it); otherwise it
is rolled back (the facts file goes, the source owns the VM again and starts it if it ran).
Either way the VM runs on exactly one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary.cycle import MOVE, Cycles
from vmreplica._internal.engine.primary.pending import PendingLog
from vmreplica._internal.engine.primary.scheduler import Scheduler
from vmreplica._internal.engine.replica import move as replica_move
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.files import read_json_object, write_json_atomic
from vmreplica._internal.ports.cluster import ClusterPort
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import InvalidArgument, InvalidState, NotFound, StorageError, VmrError

KIND = MOVE
RUNNING = "Running"
ATTACH_TIMEOUT = 120.0  # how long the source waits for the target to attach the VM


def facts_path(rec: VmRecord) -> Path:
    """Where a primary VM's facts travel: beside its first disk, in the shared storage."""
    return rec.disks[0].parent / f".vmreplica-{rec.id}.json"


def write_facts(path: Path, facts: dict[str, Any]) -> None:
    write_json_atomic(path, facts)


def read_facts(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, damaged=StorageError)


def shared(ctx: Context, rec: VmRecord) -> bool:
    """The VM's disks can be in a shared storage: it has some, none in this node's state."""
    state = ctx.config.state_dir.resolve()
    return bool(rec.disks) and not any(d.resolve().is_relative_to(state) for d in rec.disks)


async def claim(ctx: Context, rec: VmRecord) -> None:
    """On a node of a cluster: a primary VM in the shared storage is in the registry and owned
    by this node (at `replication enable`, at a move, at the node's start); refused if another
    node owns it."""
    cluster = ctx.cluster
    if cluster is None or not shared(ctx, rec) or cluster.owns(rec.id):
        return
    await cluster.register(rec.id, {"primary": str(facts_path(rec))})
    if not await cluster.take(rec.id):
        owner = await cluster.owner(rec.id)
        raise InvalidState(
            f"VM {rec.name} is owned by node {owner} of cluster {cluster.cluster}: only its "
            "owner runs and replicates it"
        )


def cluster_of(ctx: Context, what: str) -> ClusterPort:
    if ctx.cluster is None:
        raise InvalidState(f"cannot {what}: {ctx.host} is not a node of a cluster (no [cluster])")
    return ctx.cluster


class VmMove:
    def __init__(
        self, ctx: Context, vms: VmService, cycles: Cycles, pending: PendingLog,
        scheduler: Scheduler,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._vms = vms
        self._cycles = cycles
        self._pending = pending
        self._scheduler = scheduler
        ctx.journal.register(KIND, self._recover)
        vms.runtime.start_guards.append(self._only_the_owner_runs)

    def _only_the_owner_runs(self, rec: VmRecord) -> None:
        cluster = self._ctx.cluster
        if cluster is not None and cluster.foreign(rec.id):
            raise InvalidState(
                f"VM {rec.name} belongs to another node of cluster {cluster.cluster}: only its "
                "owner runs it"
            )

    async def move(self, name: str, to: str, force: bool, timeout: float) -> dict[str, Any]:
        """Move VM `name` to node `to`; return once `to` has attached it."""
        cluster = cluster_of(self._ctx, "move a VM")
        began = time.monotonic()
        rec = self._vms.find(name)
        if to == self._ctx.host:
            raise InvalidArgument(f"VM {name} is on {to} already")
        live = await cluster.live_nodes()
        if to not in live:
            raise NotFound(
                f"no live node {to} in cluster {cluster.cluster} (live: {', '.join(live)})"
            )
        row = self._ctx.stores.replications.find(rec.id)
        if row is not None and row.mode != "Primary":
            return await replica_move.move(self._ctx, cluster, rec, row, to)
        if row is not None and row.state != State.REPLICATING:
            raise InvalidState(
                f"VM {name} is busy: its replication is {row.state}; move it while it is "
                "Replicating"
            )
        if self._ctx.journal.entries(KIND, subject=rec.id):
            raise InvalidState(f"VM {name} is busy: a move of it is in progress")
        self._check_shared(rec)
        path = facts_path(rec)
        await claim(self._ctx, rec)
        ran = rec.state == RUNNING
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(
                tx, KIND, rec.id, {"to": to, "running": ran, "facts": str(path)}
            )
            self._ctx.events.record(
                "vm-move-started", f"moving VM {name} to node {to}", name, tx=tx
            )
        try:
            await self._quiesce(rec, row is not None, ran, force, timeout)
        except BaseException:
            await self._roll_back(rec.id, ran)
            raise
        rec = self._vms.by_id(rec.id) or rec
        row = self._ctx.stores.replications.find(rec.id)
        try:
            write_facts(path, {
                "vm": vm_facts(rec), "replication": row_facts(row), "running": ran,
                "from": self._ctx.host, "to": to,
            })  # fmt: skip
            faults.hit("vm.move.after_export")
        except BaseException:
            await self._roll_back(rec.id, ran)
            raise
        try:
            await cluster.move(rec.id, to)
        except VmrError as e:
            try:
                owner = await cluster.owner(rec.id)
            except VmrError:
                raise InvalidState(
                    f"the handover of VM {name} to {to} is unresolved ({e.message}); the VM is "
                    f"off, and the agent finishes or rolls back the move at its next start"
                ) from e
            if owner != to:
                await self._roll_back(rec.id, ran)
                raise
        faults.hit("vm.move.after_handover")
        self._forget(rec.id, to)
        handed = time.monotonic() - began
        attached = await wait_attached(path, to, ATTACH_TIMEOUT)
        return {
            "name": name, "id": rec.id, "source": self._ctx.host, "target": to,
            "state": attached.get("state", ""), "handover_seconds": round(handed, 3),
            "seconds": round(time.monotonic() - began, 3),
        }  # fmt: skip

    def _check_shared(self, rec: VmRecord) -> None:
        if not shared(self._ctx, rec):
            raise InvalidState(
                f"VM {rec.name} cannot move: its disks are not in the cluster's shared storage "
                "(none, or in this node's state directory)"
            )

    async def _quiesce(
        self, rec: VmRecord, replicated: bool, ran: bool, force: bool, timeout: float
    ) -> None:
        """Stop the schedule and the VM, and send the last delta: nothing stays on this node."""
        await self._scheduler.stop_vm(rec.id)
        if ran:
            try:
                await self._vms.runtime.stop(rec.name, force=force, timeout=timeout)
            except InvalidState as e:
                raise InvalidState(
                    f"cannot move VM {rec.name}: it did not power off within {timeout:.0f} s (the "
                    "guest ignored the ACPI request); it keeps running here (`vm move --force` "
                    "turns it off)"
                ) from e
        if not replicated:
            return
        try:
            await self._cycles.cycle(rec.id, datetime.now(UTC), moving=True)
        except VmrError as e:
            raise InvalidState(
                f"cannot move VM {rec.name}: its last delta did not reach the replica: {e.message}"
            ) from e
        if self._pending.entries(rec.id):
            raise InvalidState(
                f"cannot move VM {rec.name}: deltas are still waiting for the replica"
            )

    async def _roll_back(self, vm_id: str, ran: bool) -> None:
        """The VM stays here: as it was, running again if it ran."""
        rec = self._vms.by_id(vm_id)
        entry = self._ctx.journal.entries(KIND, subject=vm_id)
        if entry:
            Path(str(entry[0].data.get("facts", ""))).unlink(missing_ok=True)
        cluster = self._ctx.cluster
        if cluster is not None and not cluster.owns(vm_id):
            with contextlib.suppress(VmrError):  # nobody else takes a primary VM
                await cluster.take(vm_id)
        if rec is not None and ran and rec.state != RUNNING:
            try:
                await self._vms.runtime.start(rec.name)
            except VmrError as e:
                self._ctx.events.record(
                    "vm-move-restart-failed", f"VM {rec.name} did not start again: {e.message}",
                    rec.name, "error",
                )  # fmt: skip
        row = self._ctx.stores.replications.find(vm_id)
        if row is not None and row.mode == "Primary":
            self._scheduler.run(vm_id)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.end(tx, KIND, vm_id)
            if rec is not None:
                self._ctx.events.record(
                    "vm-move-rolled-back", f"VM {rec.name} stays on {self._ctx.host}",
                    rec.name, "warning", tx=tx,
                )  # fmt: skip

    def _forget(self, vm_id: str, to: str) -> None:
        """Handed over: this node keeps nothing of the VM (its disks are the shared ones)."""
        rec = self._vms.by_id(vm_id)
        with self._ctx.stores.db.tx() as tx:
            self._ctx.stores.replications.delete(tx, vm_id)
            self._ctx.stores.vms.delete(tx, vm_id)
            self._ctx.journal.end(tx, KIND, vm_id)
            name = rec.name if rec is not None else vm_id
            self._ctx.events.record("vm-moved", f"VM {name} moved to node {to}", name, tx=tx)
        self._pending.forget(vm_id)
        shutil.rmtree(self._vms.run_dir(vm_id), ignore_errors=True)

    async def _recover(self, entry: JournalEntry) -> None:
        """After a crash: finished if the target owns the VM, else rolled back. Runs once the
        node joined its cluster (`recover`); before that it leaves the entry."""
        cluster = self._ctx.cluster
        if cluster is None:
            return
        to = str(entry.data["to"])
        if await cluster.owner(entry.subject) == to:
            self._forget(entry.subject, to)
        else:
            await self._roll_back(entry.subject, bool(entry.data.get("running")))

    async def joined(self) -> None:
        """This node (re)joined its cluster: finish or roll back its interrupted moves, then own
        the primary VMs it holds (unless another node does)."""
        cluster = self._ctx.cluster
        if cluster is None:
            return
        await self._ctx.journal.recover(KIND)
        for row in self._ctx.stores.replications.all():
            rec = self._vms.by_id(row.vm_id)
            if row.mode == "Primary" and rec is not None:
                try:
                    await claim(self._ctx, rec)
                except InvalidState as e:
                    self._ctx.events.record("vm-owned-elsewhere", e.message, rec.name, "warning")


def vm_facts(rec: VmRecord) -> dict[str, Any]:
    return {
        "id": rec.id, "name": rec.name, "cpus": rec.cpus, "memory_mb": rec.memory_mb,
        "kernel": rec.kernel, "initrd": rec.initrd, "append": rec.append,
        "vm_dir": str(rec.vm_dir), "disks": [str(d) for d in rec.disks],
        "owned": list(rec.owned), "formats": list(rec.formats),
    }  # fmt: skip


def row_facts(row: ReplicationRow | None) -> dict[str, Any] | None:
    return None if row is None else dataclasses.asdict(row)


async def wait_attached(path: Path, to: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        facts = read_facts(path) or {}
        if facts.get("attached") == to:
            return facts
        if facts.get("error"):
            raise InvalidState(f"node {to} owns the VM but could not attach it: {facts['error']}")
        if time.monotonic() > deadline:
            raise InvalidState(
                f"the VM was handed to node {to}, which has not attached it within {timeout:.0f} s"
            )
        await asyncio.sleep(0.2)
