"""The host's event log: what an operator reads with ``vmreplica event list``.

Events are rows in the state database and are also written to the structured log, so that the
two never disagree about what happened.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from vmreplica._internal.models import Event
from vmreplica._internal.store.db import Tx
from vmreplica._internal.store.events import EventStore
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


MAX_START_DELAY = timedelta(days=7)


def start_time_of(text: str) -> datetime:
    """A ``--start-time``: ISO 8601, at most 7 days ahead (Hyper-V's limit), in UTC."""
    when = parse_iso(text, "--start-time").astimezone(UTC)
    if when > datetime.now(UTC) + MAX_START_DELAY:
        raise InvalidArgument(f"invalid --start-time {text}: at most 7 days ahead")
    return when


class EventLog:
    def __init__(self, store: EventStore, computer_name: str) -> None:
        self._store = store
        self._computer_name = computer_name

    def record(
        self,
        kind: str,
        message: str,
        vm_name: str | None = None,
        level: str = "info",
        tx: Tx | None = None,
    ) -> None:
        """Record an event, inside the caller's transaction when ``tx`` is given."""
        self._store.add(kind, message, vm_name, level, tx)
        log.log(
            logging.WARNING if level != "info" else logging.INFO,
            message,
            extra={"event": kind, "vm": vm_name},
        )

    def list(self, since: str | None = None, limit: int = 1000) -> list[Event]:
        since_dt = parse_iso(since, "--since") if since else None
        events = self._store.newest(limit, self._computer_name)
        if since_dt is not None:
            events = [e for e in events if datetime.fromisoformat(e.time) >= since_dt]
        return events
