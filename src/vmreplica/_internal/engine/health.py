"""Monitoring windows, cycle statistics and replication health: pure functions, no I/O.

``measure`` reports statistics over the current monitoring window and a health level from
Hyper-V's rules (REFERENCE.md, "Health"). Free of the database and the clock (``now`` is passed
in), the rules can be tested exactly at their boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from vmreplica._internal import validate

MODES = frozenset({"Primary", "Replica", "ExtendedReplica", "TestReplica"})
STATES = frozenset(
    {"Disabled", "ReadyForInitialReplication", "InitialReplicationInProgress",
     "WaitingForInitialReplication", "Replicating", "Suspended", "Error",
     "WaitingForStartResynchronize", "Resynchronizing", "ResynchronizeSuspended",
     "PreparedForFailover", "FailedOverWaitingCompletion", "FailedOver"}
)  # fmt: skip
INITIAL_STATES = {
    "ReadyForInitialReplication": "initial replication has not started yet",
    "InitialReplicationInProgress": "initial replication is in progress and not finished yet",
    "WaitingForInitialReplication": "the replica is waiting for initial replication to finish",
}
# States where deltas flow or should: the age of the last success means something. No cycle
# runs during initial replication or after a failover, by design; other rules explain those.
_FLOWING = frozenset(
    {"Replicating", "Suspended", "Error", "WaitingForStartResynchronize", "Resynchronizing",
     "ResynchronizeSuspended"}
)  # fmt: skip
_REPLICA_SIDE = frozenset({"Replica", "ExtendedReplica"})
MISSED_LIMIT = 0.20
STALE_AFTER = timedelta(hours=1)
HEALTHY = "replication is healthy"
# Multi-day windows need one fixed day to count from, the same on every host and restart.
EPOCH = datetime(2000, 1, 1)


@dataclass(frozen=True)
class Window:
    """A monitoring window ``[start, end)``; both ends timezone-aware."""

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        return _utc(self.start) <= _utc(moment) < _utc(self.end)


def _utc(moment: datetime) -> datetime:
    """Aware datetimes sharing a tzinfo compare by wall clock, blind to DST; UTC ones do not."""
    return moment.astimezone(UTC)


def _tiles(
    now: datetime, start_time: str, interval_sec: int, tz: tzinfo | None
) -> tuple[datetime, datetime, datetime]:
    """Boundaries (UTC) of the tile before the one holding ``now``, of that tile, and its end.

    Tiles are on the local wall clock (09:00 stays 09:00 across DST; a tile over a change is an
    hour longer or shorter), then checked against instants to settle a repeated or skipped hour.
    """
    step = timedelta(seconds=validate.monitoring_interval(interval_sec))
    hour, minute = (int(part) for part in validate.time_of_day(start_time).split(":"))
    anchor = EPOCH.replace(hour=hour, minute=minute)

    def boundary(k: int) -> datetime:
        # With tz None a naive time reads as host local time with its DST rules (a fixed offset
        # would be wrong half the year); fold=0 takes a repeated hour's first occurrence.
        return (anchor + k * step).replace(tzinfo=tz).astimezone(UTC)

    k = (now.astimezone(tz).replace(tzinfo=None) - anchor) // step
    while _utc(now) < boundary(k):
        k -= 1
    while _utc(now) >= boundary(k + 1):
        k += 1
    return boundary(k - 1), boundary(k), boundary(k + 1)


def monitoring_window(
    now: datetime,
    start_time: str,
    interval_sec: int,
    collecting_since: datetime | None = None,
    tz: tzinfo | None = None,
) -> Window:
    """The window holding ``now``; ``tz`` defaults to the host's local time zone.

    Windows start at ``start_time`` + k × ``interval_sec`` on the local wall clock, counted from
    ``start_time`` on 2000-01-01. The start is clipped to ``collecting_since`` (enable or reset)
    when later, but not past ``now``: with a 06:00 start and a 12 h interval, a VM enabled at
    14:00 collects 14:00–18:00, not data from before it existed."""
    _, start, end = _tiles(now, start_time, interval_sec, tz)
    if collecting_since is not None and collecting_since > start:
        start = min(_utc(collecting_since), _utc(now))
    return Window(start.astimezone(tz), end.astimezone(tz))


def previous_window(
    now: datetime,
    start_time: str,
    interval_sec: int,
    collecting_since: datetime | None = None,
    tz: tzinfo | None = None,
) -> Window | None:
    """The window before the current one (its statistics go to the event log); None when
    collection began only in the current window."""
    start, end, _ = _tiles(now, start_time, interval_sec, tz)
    if collecting_since is not None and collecting_since > start:
        if collecting_since >= end:
            return None
        start = collecting_since
    return Window(start.astimezone(tz), end.astimezone(tz))


@dataclass(frozen=True)
class Cycle:
    """One replication cycle, or one that was skipped (``missed``)."""

    start: datetime
    end: datetime | None
    size: int
    ok: bool
    missed: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        # Each cycle counts once: successful, missed or failed; a success has a latency.
        if self.ok and (self.missed or self.end is None):
            raise ValueError("a successful cycle has an end and is not missed")


@dataclass(frozen=True)
class Stats:
    """Measure fields over one window; sizes in bytes, latencies in seconds."""

    average_replication_size: int | None
    maximum_replication_size: int | None
    average_replication_latency: float | None
    maximum_replication_latency: float | None
    successful_replication_count: int
    missed_replication_count: int
    replication_errors: int
    missed_fraction: float

    @property
    def total_cycles(self) -> int:
        counts = self.successful_replication_count, self.missed_replication_count
        return sum(counts) + self.replication_errors


EMPTY_STATS = Stats(None, None, None, None, 0, 0, 0, 0.0)


def statistics(cycles: Sequence[Cycle], window: Window) -> Stats:
    """Statistics of the cycles that started in ``window``; sizes and latencies of successes."""
    inside = [c for c in cycles if window.contains(c.start)]
    done = [c for c in inside if c.ok]
    missed = sum(1 for c in inside if c.missed)
    sizes = [c.size for c in done]
    latencies = [(_utc(c.end) - _utc(c.start)).total_seconds() for c in done if c.end]
    n = len(done)
    return Stats(
        average_replication_size=(sum(sizes) + n // 2) // n if n else None,
        maximum_replication_size=max(sizes) if n else None,
        average_replication_latency=sum(latencies) / n if n else None,
        maximum_replication_latency=max(latencies) if n else None,
        successful_replication_count=n,
        missed_replication_count=missed,
        replication_errors=len(inside) - n - missed,
        missed_fraction=missed / len(inside) if inside else 0.0,
    )


def expected_cycles(window: Window, frequency_sec: int, now: datetime) -> int:
    """Whole periods elapsed in ``window`` up to ``now``: due cycles, recorded or not (an agent
    that was down recorded no misses)."""
    elapsed = min(_utc(now), _utc(window.end)) - _utc(window.start)
    return max(0, elapsed // timedelta(seconds=frequency_sec))


def count_missed(scheduled_at: datetime, started_at: datetime, frequency_sec: int) -> int:
    """Periods skipped when the cycle due at ``scheduled_at`` could start only at ``started_at``.

    As in Hyper-V, a period that comes while the previous cycle is still busy is missed; the
    next cycle then waits for the first period boundary at or after the moment it is free
    (:func:`next_cycle_at`), so cycles stay on the grid. With a 30 s frequency, a cycle due at
    t=30 while the previous one runs until t=70 misses t=30 and t=60 (2) and runs at t=90.
    Passing the moment it was free (70) or the moment it ran (90) gives the same count.
    """
    late = _utc(started_at) - _utc(scheduled_at)
    if late <= timedelta(0):
        return 0
    return -(-late // timedelta(seconds=frequency_sec))


def next_cycle_at(scheduled_at: datetime, started_at: datetime, frequency_sec: int) -> datetime:
    """The boundary at which the late cycle actually runs (see :func:`count_missed`)."""
    missed = count_missed(scheduled_at, started_at, frequency_sec)
    return scheduled_at + missed * timedelta(seconds=frequency_sec)


def after_cycle(due: datetime, finished: datetime, frequency_sec: int) -> tuple[datetime, int]:
    """The scheduler's step: the cycle due at ``due`` ended at ``finished``; when does the next
    one run, and how many periods passed while this one was busy (each a missed cycle)?"""
    next_due = due + timedelta(seconds=frequency_sec)
    return next_cycle_at(next_due, finished, frequency_sec), count_missed(
        next_due, finished, frequency_sec
    )


@dataclass(frozen=True)
class HealthInput:
    """One VM's replication at ``now``. ``last_success``: last successful send (primary) or
    receive (replica). ``send_failure``: why the primary's last cycle could not send, in words.
    ``paused_on_replica``: the replica side suspended. ``quarantine``: why the replica's recovery
    failed, so that it refuses changes. ``failover_pending``: a failover started,
    neither completed nor cancelled, that the state alone does not show."""

    mode: str
    state: str
    now: datetime
    last_success: datetime | None
    stats: Stats
    send_failure: str | None = None
    quarantine: str | None = None
    paused_on_replica: bool = False
    failover_pending: bool = False
    # Why the last application-consistent point could not be taken (--snapshot-frequency).
    consistency_warning: str | None = None

    def __post_init__(self) -> None:  # a misspelt state must not read as healthy
        if self.mode not in MODES:
            raise ValueError(f"unknown replication mode {self.mode!r}")
        if self.state not in STATES:
            raise ValueError(f"unknown replication state {self.state!r}")


@dataclass(frozen=True)
class Health:
    """``level`` is Normal, Warning or Critical, or None where health does not apply."""

    level: str | None
    details: list[str]


def _duration(delta: timedelta) -> str:
    days, minutes = divmod(int(delta.total_seconds()) // 60, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n) or "0 min"


def _percent(fraction: float) -> str:
    value = round(fraction * 100, 1)
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def evaluate(inp: HealthInput) -> Health:
    """Hyper-V's health rules; every rule that fires is a detail, Critical ones first.

    Disabled VMs and test-failover VMs do not replicate, so their health is None (Hyper-V's
    NotApplicable); a test VM's replica keeps its own health. A completed failover that was not
    reversed warns, because the VM is then not protected.
    """
    state, stats, primary = inp.state, inp.stats, inp.mode == "Primary"
    if state == "Disabled" or inp.mode == "TestReplica":
        return Health(None, [])
    replica_side = inp.mode in _REPLICA_SIDE
    critical: list[str] = []
    if inp.send_failure:
        critical.append(f"the primary server cannot send replication data: {inp.send_failure}")
    if state == "WaitingForStartResynchronize":
        critical.append(
            "resynchronization required: change tracking was lost, so the primary server "
            "cannot send changes until a resynchronization runs"
        )
    if state == "Error":
        critical.append("replication stopped after an error; resume replication to retry")
    if inp.quarantine:
        critical.append(
            f"the replica takes no changes: {inp.quarantine}; fix the cause, then resume "
            "replication on the replica server"
        )
    if inp.paused_on_replica or (state == "Suspended" and replica_side):
        critical.append("replication is paused on the replica server")

    warning: list[str] = []
    if inp.consistency_warning and primary and state in _FLOWING:
        warning.append(
            f"application-consistent recovery points are not being taken (they are crash-"
            f"consistent): {inp.consistency_warning}"
        )
    if stats.missed_fraction > MISSED_LIMIT:
        warning.append(
            f"{_percent(stats.missed_fraction)}% of replication cycles were missed in the "
            f"monitoring window ({stats.missed_replication_count} of {stats.total_cycles})"
        )
    age = _utc(inp.now) - _utc(inp.last_success) if inp.last_success else timedelta(0)
    if state in _FLOWING and age > STALE_AFTER:
        verb = "received" if replica_side else "sent"
        warning.append(
            f"no replication data was {verb} successfully for {_duration(age)} (more than 1 hour)"
        )
    if state in INITIAL_STATES:
        warning.append(INITIAL_STATES[state])
    if state == "PreparedForFailover":
        warning.append("a planned failover was prepared and is not completed yet")
    if state == "FailedOverWaitingCompletion" or inp.failover_pending:
        warning.append("a failover was started and is not completed or cancelled yet")
    if state == "FailedOver":
        warning.append("the VM failed over and replication was not reversed: it is not protected")
    if primary and state in ("Suspended", "ResynchronizeSuspended"):
        what = "replication" if state == "Suspended" else "resynchronization"
        warning.append(f"{what} is suspended on the primary server")

    if critical:
        return Health("Critical", critical + warning)
    return Health("Warning", warning) if warning else Health("Normal", [HEALTHY])
