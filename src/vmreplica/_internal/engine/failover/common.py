"""What the failover operations share: recovery points to run on, overlays above them, and the
ranges a replica chain received after a failover point (what a delta failback must carry).

A failover VM always runs on new overlays above a recovery point, never on the chain itself: a
failover to "Latest" first freezes ``tip`` into a point. The point is pinned (recorded in the
replication row) so that pruning leaves it alone until the failover is stopped, completed or
reversed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vmreplica._internal import extents as ext
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica import Replica, handoff
from vmreplica._internal.engine.replica.common import chains
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.extents import Extent
from vmreplica._internal.files import write_atomic
from vmreplica._internal.store.journal import JournalEntry
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import IntegrityError, InvalidArgument, NotFound, StorageError

log = logging.getLogger("vmreplica.failover")

TEST_SUFFIX = " - Test"
FAILBACK_FILE = "failback-extents.json"  # in a completed failover's storage directory
OVERLAY_DIRS = {"failover": "failover", "test-failover": "test"}  # in the replica storage


class FailoverBase:
    def __init__(self, ctx: Context, vms: VmService, replica: Replica) -> None:
        self._ctx = ctx
        self._vms = vms
        self._replica = replica
        self._store = ctx.stores.replications

    def _share(self, row: ReplicationRow) -> None:
        """In a cluster: the new state beside the chains, for a node that takes over
        (engine/replica/handoff.py)."""
        if self._ctx.cluster is not None:
            handoff.export(self._ctx, row.vm_id)

    def _row(self, name: str) -> tuple[VmRecord, ReplicationRow]:
        rec = self._vms.find(name)
        return rec, self._store.get(rec.id, name)

    async def _choose_point(self, row: ReplicationRow, point: str | None) -> int:
        """The point to run on; "Latest" freezes ``tip`` first, as it is never a backing file."""
        if point is None or point.lower() == "latest":
            return await self._replica.points.freeze(row, "Standard")
        if not point.isdigit():
            raise InvalidArgument(
                f"invalid --recovery-point {point!r}: a point id from `recovery-point list`, or Latest"
            )
        if int(point) not in self._ctx.stores.points.ids(row.vm_id):
            raise NotFound(
                f"no recovery point {point} for {row.vm_name}: see `recovery-point list {row.vm_name}`"
            )
        return int(point)

    async def _overlays(self, row: ReplicationRow, point: int, kind: str) -> list[Path]:
        root = Path(str(row.storage_dir)) / OVERLAY_DIRS[kind]
        shutil.rmtree(root, ignore_errors=True)
        return [
            await chain.overlay_for(point, disk_file(root, i))
            for i, chain in enumerate(chains(self._ctx, row))
        ]

    async def _roll_back(self, entry: JournalEntry) -> None:
        """A failover or test failover a crash cut short: its overlays (and test VM) go. A
        test failover's stop cut short ends the same way, its point unpinned."""
        row = self._store.find(entry.subject)
        test_vm = entry.data.get("test_vm_id")
        if row is not None and self._overlays_of_another_node(row, entry.kind, test_vm):
            row = None  # the overlays are the owner's now: only this entry goes
        if row is not None and row.storage_dir:
            if test_vm:  # first: it may run on the overlays
                await self._vms.unregister(str(test_vm))
            shutil.rmtree(Path(row.storage_dir) / OVERLAY_DIRS[entry.kind], ignore_errors=True)
            self._ctx.events.record(
                "recovered",
                f"rolled back an interrupted {entry.kind} of {row.vm_name}",
                row.vm_name,
            )
        with self._ctx.stores.db.tx() as tx:
            if row is not None and test_vm and row.test_vm_id == test_vm:
                self._store.update(row.vm_id, tx, test_vm_id=None, test_point=None)
            self._ctx.journal.end_entry(tx, entry.id)

    def _overlays_of_another_node(self, row: ReplicationRow, kind: str, test_vm: object) -> bool:
        """In a cluster, a former owner's entry (it died mid-step, another node took the VM
        over): the shared facts say the VM's owner now runs a failover (or a test failover
        of its own) on the overlay directory this entry would delete."""
        shared = handoff.shared_replication(self._ctx, row)
        if shared is None:
            return False
        if kind == "failover":
            return shared.get("state") in (State.FAILED_OVER_WAITING, State.FAILED_OVER)
        return shared.get("test_vm_id") not in (None, test_vm)

    async def _changes_above_point(self, row: ReplicationRow) -> dict[int, list[Extent]] | None:
        """Per disk, what the replica chain received after the failover point: the old primary
        has it, the failed-over VM does not (it runs on that point). None when no longer known.

        Empty for a failover to "Latest", whose point was frozen from ``tip`` itself. A completed
        failover deleted those images, so ``complete`` saved their ranges first.
        """
        if row.state == State.FAILED_OVER:
            saved = Path(str(row.storage_dir)) / FAILBACK_FILE
            try:
                return ext.from_json(json.loads(saved.read_text()), len(row.disks))
            except FileNotFoundError:
                return None  # completed by a version that did not save them
            except (OSError, ValueError, IntegrityError) as exc:
                log.warning("cannot read %s: %s", saved, exc)
                return None
        point = row.failover_point
        if point is None:
            return None
        changes: dict[int, list[Extent]] = {}
        for n, chain in enumerate(chains(self._ctx, row)):
            layers = [chain.rp_path(k) for k in chain.point_ids() if k > point] + [chain.tip]
            found: list[Extent] = []
            for layer in layers:
                if layer.exists():
                    found += await self._ctx.driver.allocated(layer)
            changes[n] = ext.coalesce(found)
        return changes

    async def _save_changes_above_point(self, row: ReplicationRow) -> None:
        """Before completing deletes the images above the failover point: which ranges they
        held, for a later delta failback (the old primary has that data, the VM does not).

        A repeated complete (a crash mid-delete) merges with what an earlier run saved, since
        the images it already deleted are no longer there to read.
        """
        changes = await self._changes_above_point(row)
        assert changes is not None
        path = Path(str(row.storage_dir)) / FAILBACK_FILE
        if path.exists():
            earlier = ext.from_json(json.loads(path.read_text()), len(row.disks))
            changes = ext.union(changes, earlier, disks=len(row.disks))
        try:
            write_atomic(path, json.dumps(ext.to_json(changes)).encode())
        except OSError as e:
            raise StorageError(f"cannot save the failback ranges of {row.vm_name}: {e}") from e
