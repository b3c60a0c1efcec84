"""What a failed cycle or initial copy leaves on the primary: the error in words, the state it
leads to, a failed cycle for statistics, an event."""

from __future__ import annotations

import logging
from datetime import datetime

from vmreplica._internal.engine.context import Context, allows, move
from vmreplica._internal.engine.states import Command, State
from vmreplica._internal.store.replications import COMPARED, ReplicationRow
from vmreplica.errors import IntegrityError, InvalidState, ResyncRequired, VmrError

log = logging.getLogger("vmreplica.primary")


def record_failure(
    ctx: Context, row: ReplicationRow, started: datetime, err: BaseException, missed: int
) -> None:
    message = err.message if isinstance(err, VmrError) else f"internal error: {err!r}"
    if not isinstance(err, VmrError):
        log.exception("replication cycle of %s failed", row.vm_name, exc_info=err)
    command = None
    if isinstance(err, ResyncRequired):
        command = Command.LOSE_TRACKING
    elif isinstance(err, IntegrityError | InvalidState) and row.state == State.INITIAL_IN_PROGRESS:
        command = Command.FAIL_INITIAL
    elif isinstance(err, IntegrityError | InvalidState) and row.initial_kind in COMPARED:
        # The replica refuses the compare (no copy there, another VM's): retrying cannot help.
        command = Command.STOP_INITIAL
    if command is not None:
        try:
            allows(row, command)
        except InvalidState:
            command = None  # the state moved on meanwhile: the error is still recorded
    with ctx.stores.db.tx() as tx:
        if command == Command.STOP_INITIAL:
            move(ctx, tx, row, command, last_error=message, send_failure=message,
                 initial_kind=None, resync_next=None, resync_progress=None, sequence=0,
                 acked_sequence=0)  # fmt: skip
        elif command is not None:
            move(ctx, tx, row, command, last_error=message)
        else:
            # Whatever else failed (the network, storage, a replica that refuses), the changes
            # did not get there: the primary cannot send, which is Critical.
            ctx.stores.replications.update(row.vm_id, tx, last_error=message, send_failure=message)
        ctx.stores.cycles.record(
            tx, row.vm_id, started.isoformat(), False, missed=missed, error=message
        )
        ctx.events.record(
            "replication-cycle-failed",
            f"replication of {row.vm_name} failed: {message}",
            row.vm_name,
            "error",
            tx=tx,
        )
