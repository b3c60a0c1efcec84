"""`vm move` of a replica VM within a replica cluster: its relationship moves to another node.

The chains already lie in the shared storage, and the owner writes the relationship's facts
beside them (handoff.py). A move holds the VM's replica lock and its storage lock (so no delta
is being applied), writes the facts once more, and hands the owner key to the target in one
etcd txn; the target's `acquired` hook imports the facts as after a takeover (`take_over`). A
primary's next cycle reaches the source, which redirects it to the new owner (421), or the
broker's name leads it there. One txn, nothing to journal: a crash leaves the VM owned by one
node or the other, and the facts file agrees with the chains either way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.states import State
from vmreplica._internal.ports.cluster import ClusterPort
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.store.vms import VmRecord
from vmreplica.errors import InvalidState

RUNNING = "Running"


async def move(
    ctx: Context, cluster: ClusterPort, rec: VmRecord, row: ReplicationRow, to: str
) -> dict[str, Any]:
    began = time.monotonic()
    if rec.state == RUNNING or row.state != State.REPLICATING:
        raise InvalidState(
            f"VM {rec.name} is busy: a replica VM moves while it is off and Replicating (it is "
            f"{rec.state}, {row.state})"
        )
    if not cluster.owns(rec.id):
        raise InvalidState(f"VM {rec.name} is owned by node {await cluster.owner(rec.id)}")
    assert row.storage_dir is not None
    async with (
        ctx.locks.replica(rec.id),
        cluster.writing(rec.id, Path(row.storage_dir), f"move VM {rec.name}"),
    ):
        handoff.export(ctx, rec.id)
        faults.hit("vm.move.replica_after_export")
        await cluster.move(rec.id, to)
    ctx.events.record("vm-moved", f"replica VM {rec.name} moved to node {to}", rec.name)
    seconds = round(time.monotonic() - began, 3)
    return {
        "name": rec.name, "id": rec.id, "source": ctx.host, "target": to, "state": "HandedOver",
        "handover_seconds": seconds, "seconds": seconds,
    }  # fmt: skip
