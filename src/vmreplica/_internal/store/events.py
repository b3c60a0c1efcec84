"""The event log's rows (``vmreplica event list``)."""

from __future__ import annotations

from datetime import UTC, datetime

from vmreplica._internal.models import Event
from vmreplica._internal.store.db import Database, Tx


class EventStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self, kind: str, message: str, vm_name: str | None, level: str, tx: Tx | None = None
    ) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._db.in_tx(tx) as conn:
            conn.execute(
                "INSERT INTO events(time, level, kind, vm_name, message) VALUES(?,?,?,?,?)",
                (now, level, kind, vm_name, message),
            )

    def newest(self, limit: int, computer_name: str) -> list[Event]:
        """The ``limit`` newest events, oldest first, as events of ``computer_name``."""
        rows = self._db.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [
            Event(
                computer_name, r["id"], r["time"], r["level"], r["kind"], r["vm_name"], r["message"]
            )
            for r in reversed(rows)
        ]
