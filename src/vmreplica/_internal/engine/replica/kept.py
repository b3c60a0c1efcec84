"""What arrived of a plain initial copy that was cut (the network, ``stop-initial``, either agent
dying) is kept as the base of the replica's chains instead of being deleted, with
``initial_kind = "kept"``; the primary's retry, told so by ``status``, compares against it as
against a seed (engine/primary/initial.py), so the blocks that arrived are not sent again.

Whatever the images hold, they are a valid base to compare against: the compare hashes every
block on both sides, so a block half written at the cut, or never written, differs and is sent.
That makes the step crash-safe without a journal entry of its own. The kind is recorded first,
then each image replaces its chain's (empty) base with one rename: a crash in between leaves
some bases old and some new, as valid, and the images not moved yet are kept by the next start
(recovery.py) or deleted, as valid too. The kind stays until initial replication finishes (the
plain copy's apply, or the compare's commit, clears it), so a base holding data is never taken
for the empty chain that a compressed copy (``from_empty``) needs.
"""

from __future__ import annotations

import logging
import os
import shutil

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.replica.common import REPLICA, chains, staging_dir
from vmreplica._internal.engine.states import State
from vmreplica._internal.files import fsync_dir
from vmreplica._internal.store.replications import KEPT, ReplicationRow
from vmreplica._internal.transport.delta import disk_file
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.replica")


async def keep_cut_copy(ctx: Context, row: ReplicationRow) -> bool:
    """Keep the staged images of ``row``'s cut initial copy as its chains' bases (its import
    is closed). False, with nothing changed, when there is nothing to keep here."""
    if (
        row.mode != REPLICA
        or row.storage_dir is None
        or row.state != State.WAITING_FOR_INITIAL
        or row.sequence != 0  # offline media (sequence 1) stages there too
        or row.initial_kind not in (None, KEPT)
    ):
        return False
    staging = staging_dir(row, 1)
    files = [disk_file(staging, n) for n in range(len(row.disks))]
    replicas = chains(ctx, row)
    if not files or not all(f.exists() for f in files):
        return False
    kept = 0
    try:
        for chain, file in zip(replicas, files, strict=True):
            # Only into the chain enable made (base and an empty tip): nothing else is there yet.
            if chain.point_ids() or not chain.tip.exists() or chain.resync.exists():
                return False
            if await ctx.driver.virtual_size(file) != await chain.virtual_size():
                return False
            kept += sum(length for _, length in await ctx.driver.allocated(file))
    except VmrError as e:  # an image QEMU cannot open: there is nothing to keep
        log.warning("the cut initial copy of %s is not kept: %s", row.vm_name, e)
        return False
    if not kept:  # nothing arrived: the copy over NBD again is the faster way
        return False
    with ctx.stores.db.tx() as tx:
        ctx.stores.replications.update(row.vm_id, tx, initial_kind=KEPT)
        ctx.events.record(
            "initial-copy-kept",
            f"the initial copy of {row.vm_name} was cut: the {kept / (1 << 20):.0f} MiB that "
            "arrived stay here as its base, and the next start compares against them and sends "
            "only the blocks that differ",
            row.vm_name,
            tx=tx,
        )
    faults.hit("replica.mid_keep")
    try:
        for chain, file in zip(replicas, files, strict=True):
            os.replace(file, chain.base)
            fsync_dir(chain.base.parent)
    except OSError as e:  # what moved and what did not are both valid bases (see above)
        log.warning("keeping the cut initial copy of %s stopped: %s", row.vm_name, e)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("initial copy of %s cut: %d bytes kept as its base", row.vm_name, kept)
    return True
