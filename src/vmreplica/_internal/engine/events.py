"""The host's event log: what an operator reads with ``vmreplica event list``.

Events are rows in the state database and are also written to the structured log, so that the
two never disagree about what happened.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime

from vmreplica._internal.models import Event
from vmreplica._internal.store.db import Database
from vmreplica.errors import InvalidArgument

log = logging.getLogger("vmreplica.events")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_iso(value: str, what: str = "time") -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise InvalidArgument(f"invalid {what} {value!r}: expected ISO 8601") from e
    return parsed if parsed.tzinfo else parsed.astimezone()


class EventLog:
    def __init__(self, db: Database, computer_name: str) -> None:
        self._db = db
        self._computer_name = computer_name

    def record(
        self,
        kind: str,
        message: str,
        vm_name: str | None = None,
        level: str = "info",
        conn: sqlite3.Connection | None = None,
    ) -> None:
        """Record an event, inside the caller's transaction when ``conn`` is given."""
        sql = "INSERT INTO events(time, level, kind, vm_name, message) VALUES(?,?,?,?,?)"
        params = (now_iso(), level, kind, vm_name, message)
        if conn is not None:
            conn.execute(sql, params)
        else:
            with self._db.tx() as c:
                c.execute(sql, params)
        log.log(
            logging.WARNING if level != "info" else logging.INFO,
            message,
            extra={"event": kind, "vm": vm_name},
        )

    def list(self, since: str | None = None, limit: int = 1000) -> list[Event]:
        rows = self._db.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        since_dt = parse_iso(since, "--since") if since else None
        events = [
            Event(
                computer_name=self._computer_name,
                id=r["id"],
                time=r["time"],
                level=r["level"],
                kind=r["kind"],
                vm_name=r["vm_name"],
                message=r["message"],
            )
            for r in reversed(rows)
        ]
        if since_dt is not None:
            events = [e for e in events if datetime.fromisoformat(e.time) >= since_dt]
        return events
