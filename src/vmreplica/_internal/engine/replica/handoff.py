"""A replica relationship that follows its VM across the nodes of a cluster (docs/CLUSTER.md).

The relationship's facts live in the owning node's own database; the chains live in the shared
storage. So the owner also writes the facts beside the chains (`relationship.json` in the VM's
replica storage, atomically) each time it finishes a write there, while it still holds the VM's
storage lock: the file and the chains always agree. A node that takes the VM over (its owner's
lease expired) and holds no relationship for it imports the file in one transaction, then lets
each chain finish what a crash left half done (`ReplicaChain.recover`).

What a crash of the owner can leave: a delta committed into `tip` whose sequence the file does
not have yet (the owner died between the commit and the file). The primary, which had no answer
for it, sends it again and the new owner applies it a second time; a delta holds whole blocks
of one instant, so writing them again yields the same image.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica.common import chains
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.files import read_json_object, write_json_atomic
from vmreplica._internal.store.replications import ReplicationRow, Settings

FILE = "relationship.json"
STEP_FILE = "step.json"  # the delta being applied: journaled on the owner, beside the chains
# A `failover complete` under way ({"point"}): its journal entry is in the owner's database,
# this file beside the chains tells a node that takes the VM over (engine/failover/unplanned.py).
COMPLETING_FILE = "failover-complete.json"
COMPLETE_KIND = "failover-complete"  # its journal kind


def begin_completion(storage: Path, point: int) -> None:
    """Before `failover complete` deletes its first file: a node taking over finishes it."""
    write_json_atomic(storage / COMPLETING_FILE, {"point": point})


def end_completion(storage: Path) -> None:
    (storage / COMPLETING_FILE).unlink(missing_ok=True)


def completing(storage: Path) -> int | None:
    """The failover point of a `failover complete` begun on `storage`'s chains, if any."""
    point = (read_json_object(storage / COMPLETING_FILE) or {}).get("point")
    return point if isinstance(point, int) else None


def adopt_completion(ctx: Context, vm_id: str, storage: Path) -> bool:
    """A `failover complete` the former owner began and did not finish: journaled here (its
    deletes may have begun, so it can only be finished; the caller recovers the entry)."""
    point = completing(storage)
    row = ctx.stores.replications.find(vm_id)
    if point is None or row is None or row.state != State.FAILED_OVER_WAITING:
        return False
    if row.failover_point != point:
        return False
    if not ctx.journal.entries(COMPLETE_KIND, subject=vm_id):
        with ctx.stores.db.tx() as tx:
            ctx.journal.begin(tx, COMPLETE_KIND, vm_id, {"point": point})
    return True


def write_step(ctx: Context, vm_id: str, data: dict[str, Any]) -> None:
    """Record beside the chains that a verified, journaled stage is being applied (call it
    under the storage lock, after the journal entry and before the first write to a chain):
    a node taking over finishes that apply instead of letting the primary send it again."""
    row = ctx.stores.replications.find(vm_id)
    if row is None or not row.storage_dir:
        return
    write_json_atomic(Path(row.storage_dir) / STEP_FILE, data)


def read_step(storage: Path) -> dict[str, Any] | None:
    return read_json_object(storage / STEP_FILE)


def export(ctx: Context, vm_id: str) -> None:
    """Write the facts of `vm_id`'s replica beside its chains (call it under the storage lock)."""
    row = ctx.stores.replications.find(vm_id)
    vm = ctx.stores.vms.by_id(vm_id)
    if row is None or vm is None or not row.storage_dir:
        return
    facts = {
        "vm": {
            "id": vm.id, "name": vm.name, "cpus": vm.cpus, "memory_mb": vm.memory_mb,
            "kernel": vm.kernel, "initrd": vm.initrd, "append": vm.append,
            "vm_dir": str(vm.vm_dir), "disks": [str(d) for d in vm.disks],
        },
        "replication": dataclasses.asdict(row),
        "points": [dataclasses.asdict(p) for p in ctx.stores.points.all(vm_id)],
    }  # fmt: skip
    write_json_atomic(Path(row.storage_dir) / FILE, facts)


def exported(storage: Path) -> dict[str, Any] | None:
    return read_json_object(storage / FILE)


def shared_replication(ctx: Context, row: ReplicationRow) -> dict[str, Any] | None:
    """In a cluster, the replication facts the shared storage holds for ``row``'s VM, which
    the VM's owner keeps; None on a single host, or when the storage holds another VM's."""
    if ctx.cluster is None or not row.storage_dir:
        return None
    facts = exported(Path(row.storage_dir))
    if facts is None or facts["vm"]["id"] != row.vm_id:
        return None
    return dict(facts["replication"])


async def take_over(ctx: Context, vms: VmService, vm_id: str, storage: Path) -> bool:
    """This node now owns `vm_id`: hold its relationship as the shared storage has it. The file
    wins over this node's own rows, which are older when this node owned the VM before another
    one did. False when there is nothing to take (no file: the VM never finished its enable),
    and then this node's own rows, if any, stand."""
    facts = exported(storage)
    if facts is None or facts["vm"]["id"] != vm_id:
        return ctx.stores.replications.find(vm_id) is not None
    v, r = facts["vm"], dict(facts["replication"])
    local = ctx.stores.replications.find(vm_id)
    if local is not None and (local.sequence, local.state) == (r["sequence"], r["state"]):
        adopt_completion(ctx, vm_id, storage)
        return True  # this node's rows are the file's: keep them (and their cycle history)
    r["settings"] = Settings(**r["settings"])
    r["disks"] = tuple(r["disks"])
    if r["mode"] == "Replica":
        # This node is the replica server now (a reverse replication calls it back).
        r["replica_server"] = ctx.host
    if r.get("test_vm_id") is not None and ctx.stores.vms.by_id(r["test_vm_id"]) is None:
        # A test VM is no part of the facts that travel: it ended with its node.
        r["test_vm_id"] = r["test_point"] = None
        shutil.rmtree(storage / "test", ignore_errors=True)
    row = ReplicationRow(**r)
    async with ctx.locks.replica(vm_id):
        with ctx.stores.db.tx() as tx:
            disks = [Path(d) for d in v["disks"]]
            if ctx.stores.vms.by_id(vm_id) is None:
                vms.register(
                    tx, v["id"], v["name"], v["cpus"], v["memory_mb"], Path(v["vm_dir"]),
                    disks, v["kernel"], v["initrd"], v["append"],
                )  # fmt: skip
            else:  # a former owner's record: the disks are the file's (a failover's overlays)
                vms.set_disks(tx, vm_id, disks)
            ctx.stores.replications.delete(tx, vm_id)  # with its points and cycles
            ctx.stores.replications.insert(tx, row)
            for p in facts["points"]:
                ctx.stores.points.add(tx, vm_id, p["id"], p["creation_time"], p["kind"])
            ctx.events.record(
                "replica-taken-over",
                f"replica VM {row.vm_name} taken over from the shared storage at sequence "
                f"{row.sequence}",
                row.vm_name,
                tx=tx,
            )
        pinned = frozenset(p["id"] for p in facts["points"])
        for chain in chains(ctx, row):
            await chain.recover(pinned)
    adopt_completion(ctx, vm_id, storage)
    return True
