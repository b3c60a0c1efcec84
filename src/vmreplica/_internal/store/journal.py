"""The journal's rows: the intent of a multi-step operation, written in the transaction of its
first change and deleted in the transaction of its last. What each kind means, and how it is
finished after a crash, is the engine's (engine/journal.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from vmreplica._internal.store.db import Database, Tx


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    id: int
    kind: str
    subject: str  # the VM id the operation is about
    data: dict[str, Any]
    created: str


class JournalStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, tx: Tx, kind: str, subject: str, data: dict[str, Any]) -> int:
        created = datetime.now(UTC).isoformat(timespec="seconds")
        cursor = tx.execute(
            "INSERT INTO journal(kind, subject, step, data, created) VALUES(?, ?, 'start', ?, ?)",
            (kind, subject, json.dumps(data), created),
        )
        return int(cursor.lastrowid or 0)

    def remove(self, tx: Tx, entry: int) -> None:
        tx.execute("DELETE FROM journal WHERE id=?", (entry,))

    def remove_all(self, tx: Tx, kind: str | None, subject: str) -> None:
        if kind is None:
            tx.execute("DELETE FROM journal WHERE subject=?", (subject,))
        else:
            tx.execute("DELETE FROM journal WHERE kind=? AND subject=?", (kind, subject))

    def exists(self, entry: int) -> bool:
        return self._db.query_one("SELECT 1 FROM journal WHERE id=?", (entry,)) is not None

    def entries(
        self, kinds: tuple[str, ...] | None = None, subject: str | None = None
    ) -> list[JournalEntry]:
        sql, params = "SELECT * FROM journal WHERE 1=1", list[str]()
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            params += kinds
        if subject is not None:
            sql += " AND subject=?"
            params.append(subject)
        return [
            JournalEntry(r["id"], r["kind"], r["subject"], json.loads(r["data"]), r["created"])
            for r in self._db.query(sql + " ORDER BY id", tuple(params))
        ]
