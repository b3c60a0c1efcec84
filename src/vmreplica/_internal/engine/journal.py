"""The journal: every multi-step operation that touches files records its intent first, and a
registry of kinds says how to finish or roll back each one after a crash.

A step writes its entry in the same transaction as its first change (:meth:`Journal.begin`) and
deletes it in the transaction of its last (:meth:`Journal.end`). At start-up
:meth:`Journal.recover` hands every entry left, oldest first, to the function registered for its
kind. One entry that cannot be recovered is reported and kept for the next start; it never keeps
the agent, or any other entry, from starting.

Kinds (registered by the module that owns the operation):

- ``apply``, ``freeze``, ``prune``: a delta into a replica chain, a recovery point frozen from
  ``tip``, the oldest point folded into ``base`` (engine/replica/); finished.
- ``resync-commit``: a resynchronization's overlays folded into ``tip`` (engine/replica/); finished.
- ``failover``, ``test-failover``: overlays above a recovery point (engine/failover/); rolled back.
- ``failover-complete``: the points above a failover's point and ``tip`` being deleted
  (engine/failover/unplanned.py); finished. In a cluster, also marked beside the chains: the
  node that takes the VM over journals it and finishes it; a former owner whose entry the
  shared facts show finished (or moved on) elsewhere only drops it.
- ``become-replica``: the old primary's disks moved into replica chains; rolled back.
- ``reverse``: the new primary's failback delta not cut yet; finished.
- ``delete-storage``: a replica VM's storage being deleted with the VM (engine/vms/); finished.
- ``seed-adopt``: a seed copy's disks moved into replica chains (engine/replica/seed.py);
  rolled back.
- ``fsfreeze``: a guest's file systems frozen for an application-consistent delta
  (engine/primary/consistency.py); thawed.
- ``media-import``: offline media becoming a replica's base, then the queued deltas applied
  (engine/replica/media.py); rolled back before the bases are in place, finished after.
- ``vm-move``: a primary VM handed to another node of its cluster (engine/primary/move.py);
  recovered once the node joined its cluster: finished if the target owns the VM, else rolled
  back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.store.db import Tx
from vmreplica._internal.store.journal import JournalEntry, JournalStore
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.journal")

Recover = Callable[[JournalEntry], Awaitable[None]]

KINDS = (
    "apply", "freeze", "prune", "resync-commit", "failover", "test-failover", "failover-complete",
    "become-replica", "reverse", "delete-storage", "seed-adopt", "media-import", "fsfreeze",
    "vm-move",
)  # fmt: skip


class Journal:
    def __init__(self, store: JournalStore, events: EventLog) -> None:
        self._store = store
        self._events = events
        self._recover: dict[str, Recover] = {}

    def register(self, kind: str, recover: Recover) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown journal kind {kind!r}: add it to KINDS and document it")
        self._recover[kind] = recover

    def begin(self, tx: Tx, kind: str, subject: str, data: dict[str, Any]) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown journal kind {kind!r}")
        return self._store.add(tx, kind, subject, data)

    def end(self, tx: Tx, kind: str | None, subject: str) -> None:
        """Every entry of ``kind`` (every kind, for None) about ``subject`` is done."""
        self._store.remove_all(tx, kind, subject)

    def end_entry(self, tx: Tx, entry: int) -> None:
        self._store.remove(tx, entry)

    def entries(self, *kinds: str, subject: str | None = None) -> list[JournalEntry]:
        return self._store.entries(kinds or None, subject)

    def pending(self, entry: int) -> bool:
        return self._store.exists(entry)

    async def recover(self, *kinds: str, subject: str | None = None) -> None:
        """Finish or roll back every entry of ``kinds`` (about ``subject``, if given), oldest
        first, each on its own."""
        for entry in self.entries(*kinds, subject=subject):
            if not self._store.exists(entry.id):
                continue  # a handler that recovered a whole VM took this one too
            handler = self._recover.get(entry.kind)
            if handler is None:
                raise RuntimeError(f"no recovery registered for journal kind {entry.kind!r}")
            try:
                await handler(entry)
            except Exception as e:
                if not isinstance(e, VmrError):
                    log.exception("recovery of an interrupted %s failed", entry.kind)
                self._events.record(
                    "recovery-failed",
                    f"cannot finish an interrupted {entry.kind} of VM {entry.subject} (retried at "
                    f"the next start): {e}",
                    level="error",
                )
