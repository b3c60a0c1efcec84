"""Test failover: a separate "<VM> - Test" VM on overlays above a recovery point, while
replication goes on (journal kind ``test-failover``, for its start and its stop: rolled back, the
test VM and its overlays removed and its point unpinned, if a crash interrupts either)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from vmreplica._internal import faults
from vmreplica._internal.engine.failover.common import TEST_SUFFIX, FailoverBase
from vmreplica._internal.engine.vms import VmRecord
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica.errors import InvalidState


class TestFailover(FailoverBase):
    def register(self) -> None:
        self._ctx.journal.register("test-failover", self._roll_back)

    async def start(self, rec: VmRecord, row: ReplicationRow, point: str | None) -> ReplicationRow:
        if row.test_vm_id is not None:
            raise InvalidState(
                f"a test failover of {rec.name} is already running: `failover stop {rec.name}` first"
            )
        test_name = rec.name + TEST_SUFFIX
        if self._ctx.stores.vms.exists(name=test_name):
            raise InvalidState(f"a VM named {test_name!r} already exists")
        async with self._ctx.locks.replica(row.vm_id):
            chosen = await self._choose_point(row, point)
            test_id = str(uuid.uuid4())
            with self._ctx.stores.db.tx() as tx:
                self._ctx.journal.begin(
                    tx, "test-failover", row.vm_id, {"point": chosen, "test_vm_id": test_id}
                )
            overlays = await self._overlays(row, chosen, "test-failover")
            with self._ctx.stores.db.tx() as tx:
                self._vms.register(
                    tx, test_id, test_name, rec.cpus, rec.memory_mb,
                    Path(str(row.storage_dir)) / "test", overlays, rec.kernel, rec.initrd,
                    rec.append,
                )  # fmt: skip
                self._store.update(row.vm_id, tx, test_vm_id=test_id, test_point=chosen)
                self._ctx.journal.end(tx, "test-failover", row.vm_id)
                self._ctx.events.record(
                    "test-failover-started",
                    f"test VM {test_name!r} created on recovery point {chosen}",
                    rec.name,
                    tx=tx,
                )
        self._share(row)
        return self._store.get(row.vm_id, rec.name)

    async def stop(self, row: ReplicationRow) -> None:
        """Journaled as the start is (the same kind): a crash on the way is finished by the
        roll-back at the next start, which also unpins the point."""
        assert row.test_vm_id is not None
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(
                tx, "test-failover", row.vm_id, {"point": row.test_point, "test_vm_id": row.test_vm_id}
            )  # fmt: skip
        await self._vms.unregister(row.test_vm_id)
        faults.hit("failover.mid_test_stop")  # the test VM gone, its point still pinned
        shutil.rmtree(Path(str(row.storage_dir)) / "test", ignore_errors=True)
        with self._ctx.stores.db.tx() as tx:
            self._store.update(row.vm_id, tx, test_vm_id=None, test_point=None)
            self._ctx.journal.end(tx, "test-failover", row.vm_id)
            self._ctx.events.record(
                "test-failover-stopped", f"test VM of {row.vm_name} removed", row.vm_name, tx=tx
            )
        self._share(row)
