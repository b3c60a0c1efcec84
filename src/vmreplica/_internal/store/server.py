"""The replication server's settings (a key-value table) and its authorization entries."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vmreplica._internal.store.db import Database, Tx


@dataclasses.dataclass(frozen=True)
class AuthRow:
    allowed_primary: str
    storage_location: str
    trust_group: str


class SettingsStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: str, default: Any = None) -> Any:
        row = self._db.query_one("SELECT value FROM settings WHERE key=?", (key,))
        return default if row is None else json.loads(row["value"])

    def put(self, tx: Tx, key: str, value: Any) -> None:
        tx.execute(
            "INSERT INTO settings(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )


class AuthStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[AuthRow]:
        return [
            AuthRow(r["allowed_primary"], r["storage_location"], r["trust_group"])
            for r in self._db.query("SELECT * FROM auth_entries ORDER BY allowed_primary")
        ]

    def insert(self, tx: Tx, row: AuthRow) -> None:
        tx.execute(
            "INSERT INTO auth_entries(allowed_primary, storage_location, trust_group) "
            "VALUES(?,?,?)",
            (row.allowed_primary, row.storage_location, row.trust_group),
        )

    def update(
        self, tx: Tx, allowed_primary: str, storage_location: str | None, trust_group: str | None
    ) -> None:
        if storage_location is not None:
            tx.execute(
                "UPDATE auth_entries SET storage_location=? WHERE allowed_primary=?",
                (storage_location, allowed_primary),
            )
        if trust_group is not None:
            tx.execute(
                "UPDATE auth_entries SET trust_group=? WHERE allowed_primary=?",
                (trust_group, allowed_primary),
            )

    def delete(self, tx: Tx, allowed_primary: str) -> None:
        tx.execute("DELETE FROM auth_entries WHERE allowed_primary=?", (allowed_primary,))
