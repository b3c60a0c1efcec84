"""What every part of the replica side shares: the chains of a replica VM, who may write it,
and whether it takes changes at all."""

from __future__ import annotations

import json
from pathlib import Path

from vmreplica._internal.engine.authorization import ANY_SERVER, Authorization
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.ports.hypervisor import ReplicaChain
from vmreplica._internal.store.db import Tx
from vmreplica._internal.store.replications import ReplicationRow, Settings
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.redirect import Misdirected
from vmreplica.errors import AccessDenied, InvalidState, NotFound

REPLICA = "Replica"
BOOT_DIR = "boot"  # in the replica VM's storage: the kernel and initrd copied from the primary


def register_replica(
    ctx: Context, vms: VmService, tx: Tx, authz: Authorization, peer_names: list[str],
    req: p.EnableRequest, name: str, settings: Settings, storage: Path, tips: list[Path],
    initial_kind: str | None = None,
) -> None:  # fmt: skip
    """In ``tx``: the replica VM of a primary's ``enable`` (its chains' tips as disks, its boot
    files in the storage's boot directory) and its relationship, waiting for initial replication."""
    boot = {k: v for k, v in (("kernel", req.kernel), ("initrd", req.initrd)) if v}
    vms.register(
        tx, req.vm_id, name, req.cpus, req.memory_mb, storage, tips,
        str(storage / BOOT_DIR / "kernel") if req.kernel else None,
        str(storage / BOOT_DIR / "initrd") if req.initrd else None, req.append,
    )  # fmt: skip
    now = now_iso()
    ctx.stores.replications.insert(
        tx,
        ReplicationRow(
            vm_id=req.vm_id, vm_name=name, mode=REPLICA, state=State.WAITING_FOR_INITIAL,
            primary_server=peer_names[0], replica_server=ctx.host, replica_port=req.replica_port,
            authentication_type=authz.authentication_type, settings=settings,
            disks=tuple(range(len(req.disk_sizes))), trust_group=authz.trust_group,
            auth_entry=authz.entry, storage_dir=str(storage), sequence=0, acked_sequence=0,
            generation=0, last_replication_time=None, last_replication_size=None,
            initial_progress=None, initial_size=None, enabled_time=now, stats_since=now,
            last_error=None, send_failure=None, last_rp_time=None, next_rp_id=1,
            peer_port=req.primary_port, initial_kind=initial_kind,
            boot_files=json.dumps({k: {"size": v.size, "blake3": v.blake3} for k, v in boot.items()}),
        ),
    )  # fmt: skip


def chain_dir(storage: Path, n: int) -> Path:
    """The directory of the chain of replicated disk ``n`` in a replica VM's storage."""
    return storage / f"disk{n}"


def chains(ctx: Context, row: ReplicationRow) -> list[ReplicaChain]:
    assert row.storage_dir is not None
    storage = Path(row.storage_dir)
    return [ctx.driver.chain(chain_dir(storage, n)) for n in range(len(row.disks))]


def received_sequence(ctx: Context, row: ReplicationRow) -> int:
    """The newest delta the replica holds: applied, or, while Resynchronizing, journaled and
    still to apply (such a delta is answered before its apply, receive.py)."""
    if row.state != State.RESYNCHRONIZING:
        return row.sequence
    entries = ctx.journal.entries("apply", subject=row.vm_id)
    return max([row.sequence, *(int(e.data.get("sequence", 0)) for e in entries)])


def staging_dir(row: ReplicationRow, sequence: int) -> Path:
    return Path(str(row.storage_dir)) / "staging" / str(sequence)


def replica_row(ctx: Context, vm_id: str) -> ReplicationRow:
    row = ctx.stores.replications.find(vm_id)
    if row is None or row.mode != REPLICA:
        raise NotFound(f"no replica VM with id {vm_id} on {ctx.host}")
    return row


def check_sender(
    ctx: Context, row: ReplicationRow, authz: Authorization, peer_names: list[str]
) -> None:
    """Only the creating server, or a server of the same trust group, may write this replica.

    A trust group is what authorization entries give; a peer admitted only because replication
    is allowed from any server has none of its own (every such peer gets the default group), so
    it is a partner of no replica but its own, and no peer is one of such a replica."""
    if row.primary_server in peer_names or (
        authz.by_entry and row.auth_entry != ANY_SERVER and authz.trust_group == row.trust_group
    ):
        return
    ctx.refusals["trust-group"] += 1
    peer = peer_names[0] if peer_names else "this peer"
    if authz.by_entry and row.auth_entry != ANY_SERVER:
        why = f"is in trust group {authz.trust_group}, but replica VM {row.vm_name} belongs to "
        why += f"trust group {row.trust_group}"
    else:  # one of them came in only because replication is allowed from any server
        why = f"did not create replica VM {row.vm_name}, and replication allowed from any "
        why += "server makes no trust group"
    err = AccessDenied(f"not authorized: {peer} {why}")
    ctx.events.record(
        "delta-refused", f"refused a request for {row.vm_name}: {err.message}", row.vm_name,
        "warning",
    )  # fmt: skip
    raise err


def check_not_quarantined(ctx: Context, row: ReplicationRow) -> None:
    if row.quarantine is not None:
        raise InvalidState(
            f"replica VM {row.vm_name} on {ctx.host} takes no changes: {row.quarantine}; fix the "
            f"cause, then run `vmreplica replication resume {row.vm_name}` on {ctx.host}"
        )


async def redirect_if_elsewhere(ctx: Context, vm_id: str) -> None:
    """In a cluster, a request for a VM another node owns: a redirect naming that node
    (transport/redirect.py). A node that holds the VM's relationship but does not own it (a
    former owner) refuses: its facts may be older than the shared storage's."""
    if ctx.cluster is None:
        return
    owner = await ctx.cluster.owner_address(vm_id)
    if owner is not None:
        raise Misdirected(vm_id, *owner)
    if ctx.stores.replications.find(vm_id) is not None:
        ctx.cluster.check(vm_id, "answer for this VM")
