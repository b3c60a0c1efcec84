"""Applying a received, verified delta into a replica VM's chains (journal kind ``apply``).

A journaled stage is whole: its files were checked before the entry was written, and they
disappear one by one only as each is committed into its chain. So a missing disk file means
"applied", and the sequence, statistics and cycle are recorded once, by whichever run of
:meth:`Applier.finish` gets there first: the request that staged it, the same agent right after
a failure, or a restarted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.engine.context import Context, move
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.common import chains, replica_row
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport.delta import disk_file


class Applier:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def journal(self, vm_id: str, sequence: int, staging: Path, started: str, **extra: Any) -> None:
        data = {"sequence": sequence, "staging": str(staging), "started": started, **extra}
        with self._ctx.stores.db.tx() as tx:
            self._ctx.journal.begin(tx, "apply", vm_id, data)
        if self._ctx.cluster is not None:  # the intent beside the chains (handoff.py)
            handoff.write_step(self._ctx, vm_id, data)

    async def finish(
        self,
        row: ReplicationRow,
        sequence: int,
        staging: Path,
        started: str,
        size: int | None = None,
    ) -> None:
        """Apply a staged, verified delta; idempotent, so recovery simply calls it again."""
        current = replica_row(self._ctx, row.vm_id)
        manifest_file = staging / wire.MANIFEST
        if manifest_file.exists():
            manifest = wire.DeltaManifest.from_json(manifest_file.read_bytes())
            size = sum(d.file_size for d in manifest.disks)
        initial = current.state == State.WAITING_FOR_INITIAL
        for i, chain in enumerate(chains(self._ctx, current)):
            delta = disk_file(staging, i)
            if initial:
                if delta.exists():
                    await chain.adopt_as_base(delta)
            else:
                await chain.apply_delta(delta, missing_ok=True)
            faults.hit("replica.mid_apply")
        now, size = now_iso(), size or 0
        with self._ctx.stores.db.tx() as tx:
            if current.sequence < sequence:
                fields: dict[str, Any] = {}
                if initial:
                    move(self._ctx, tx, current, Command.FINISH_INITIAL)
                    # A base kept from a cut copy (kept.py) is replaced by now.
                    fields = {"last_rp_time": now, "initial_size": size, "initial_kind": None}
                    self._ctx.events.record(
                        "initial-replication-done",
                        f"initial replication of {row.vm_name} applied",
                        row.vm_name,
                        tx=tx,
                    )
                self._ctx.stores.replications.update(
                    row.vm_id, tx, sequence=sequence, last_replication_time=now,
                    last_replication_size=size, **fields,
                )  # fmt: skip
                self._ctx.stores.cycles.record(tx, row.vm_id, started, True, sequence, size)
            for entry in self._ctx.journal.entries("apply", subject=row.vm_id):
                if int(entry.data.get("sequence", 0)) <= sequence:
                    self._ctx.journal.end_entry(tx, entry.id)
        shutil.rmtree(staging, ignore_errors=True)
