"""Every repository of one host's state database, opened together."""

from __future__ import annotations

import dataclasses

from vmreplica._internal.store.db import Database
from vmreplica._internal.store.events import EventStore
from vmreplica._internal.store.journal import JournalStore
from vmreplica._internal.store.replications import CycleStore, PointStore, ReplicationStore
from vmreplica._internal.store.server import AuthStore, SettingsStore
from vmreplica._internal.store.vms import VmStore


@dataclasses.dataclass(frozen=True)
class Stores:
    db: Database
    replications: ReplicationStore
    cycles: CycleStore
    points: PointStore
    vms: VmStore
    journal: JournalStore
    settings: SettingsStore
    auth: AuthStore
    events: EventStore

    @classmethod
    def open(cls, db: Database) -> Stores:
        return cls(
            db=db,
            replications=ReplicationStore(db),
            cycles=CycleStore(db),
            points=PointStore(db),
            vms=VmStore(db),
            journal=JournalStore(db),
            settings=SettingsStore(db),
            auth=AuthStore(db),
            events=EventStore(db),
        )
