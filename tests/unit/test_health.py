"""Monitoring windows, cycle statistics and health rules (engine/health.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest

from vmreplica._internal.engine.health import (
    EMPTY_STATS,
    HEALTHY,
    Cycle,
    Health,
    HealthInput,
    Stats,
    Window,
    after_cycle,
    count_missed,
    evaluate,
    expected_cycles,
    monitoring_window,
    next_cycle_at,
    previous_window,
    statistics,
)
from vmreplica.errors import InvalidArgument

try:
    from zoneinfo import ZoneInfo

    BERLIN: tzinfo | None = ZoneInfo("Europe/Berlin")
except Exception:  # no tz database on this machine
    BERLIN = None

needs_tzdata = pytest.mark.skipif(BERLIN is None, reason="no time zone database")
IST = timezone(timedelta(hours=5, minutes=30))
H = 3600
DAY = 24 * H


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


# --- monitoring windows ------------------------------------------------------------------


class TestHyperVExample:
    """06:00 start, 12 h interval, VM enabled at 14:00: 14:00–18:00 first, then 18:00–06:00."""

    enabled = utc(2024, 5, 6, 14, 0)

    def window(self, now: datetime) -> Window:
        return monitoring_window(now, "06:00", 12 * H, self.enabled, tz=UTC)

    def test_first_window_is_clipped_to_enable_time(self) -> None:
        assert self.window(utc(2024, 5, 6, 15, 30)) == Window(self.enabled, utc(2024, 5, 6, 18))

    def test_enable_moment_itself_is_in_the_first_window(self) -> None:
        assert self.window(self.enabled) == Window(self.enabled, utc(2024, 5, 6, 18))

    @pytest.mark.parametrize(
        "now", [utc(2024, 5, 6, 18), utc(2024, 5, 6, 23, 59), utc(2024, 5, 7, 5, 59, 59)]
    )
    def test_second_window_runs_to_next_morning(self, now: datetime) -> None:
        assert self.window(now) == Window(utc(2024, 5, 6, 18), utc(2024, 5, 7, 6))

    def test_third_window(self) -> None:
        assert self.window(utc(2024, 5, 7, 6)) == Window(utc(2024, 5, 7, 6), utc(2024, 5, 7, 18))

    def test_previous_window(self) -> None:
        prev = previous_window(utc(2024, 5, 6, 20), "06:00", 12 * H, self.enabled, tz=UTC)
        assert prev == Window(self.enabled, utc(2024, 5, 6, 18))
        prev = previous_window(utc(2024, 5, 7, 7), "06:00", 12 * H, self.enabled, tz=UTC)
        assert prev == Window(utc(2024, 5, 6, 18), utc(2024, 5, 7, 6))

    def test_no_previous_window_before_collection_began(self) -> None:
        assert previous_window(utc(2024, 5, 6, 15), "06:00", 12 * H, self.enabled, tz=UTC) is None

    def test_in_a_fixed_offset_zone(self) -> None:
        enabled = datetime(2024, 5, 6, 14, tzinfo=IST)
        now = datetime(2024, 5, 6, 20, tzinfo=IST).astimezone(UTC)  # any zone for "now"
        win = monitoring_window(now, "06:00", 12 * H, enabled, tz=IST)
        assert win == Window(
            datetime(2024, 5, 6, 18, tzinfo=IST), datetime(2024, 5, 7, 6, tzinfo=IST)
        )
        assert win.start.utcoffset() == timedelta(hours=5, minutes=30)
        assert win.start.hour == 18  # shown in local time
        prev = previous_window(now, "06:00", 12 * H, enabled, tz=IST)
        assert prev == Window(enabled, datetime(2024, 5, 6, 18, tzinfo=IST))


@pytest.mark.parametrize(
    ("start_time", "interval", "now", "expected"),
    [
        ("09:00", H, utc(2024, 3, 10, 13, 25), (utc(2024, 3, 10, 13), utc(2024, 3, 10, 14))),
        (
            "09:30",
            H,
            utc(2024, 3, 10, 13, 25),
            (utc(2024, 3, 10, 12, 30), utc(2024, 3, 10, 13, 30)),
        ),
        ("09:00", 8 * H, utc(2024, 3, 10, 3), (utc(2024, 3, 10, 1), utc(2024, 3, 10, 9))),
        ("09:00", DAY, utc(2024, 3, 10, 8), (utc(2024, 3, 9, 9), utc(2024, 3, 10, 9))),
        ("09:00", DAY, utc(2024, 3, 10, 9), (utc(2024, 3, 10, 9), utc(2024, 3, 11, 9))),
        # multi-day tiles count from 2000-01-01: 2024-03-09 is 8834 days (even, a Saturday) on
        ("09:00", 2 * DAY, utc(2024, 3, 10, 12), (utc(2024, 3, 9, 9), utc(2024, 3, 11, 9))),
        ("09:00", 2 * DAY, utc(2024, 3, 11, 8), (utc(2024, 3, 9, 9), utc(2024, 3, 11, 9))),
        ("09:00", 2 * DAY, utc(2024, 3, 11, 9), (utc(2024, 3, 11, 9), utc(2024, 3, 13, 9))),
        ("09:00", 7 * DAY, utc(2024, 3, 10, 12), (utc(2024, 3, 9, 9), utc(2024, 3, 16, 9))),
        ("09:00", 7 * DAY, utc(2024, 3, 9, 8, 59), (utc(2024, 3, 2, 9), utc(2024, 3, 9, 9))),
        # before the anchor date, too
        ("00:00", 7 * DAY, utc(1999, 12, 31), (utc(1999, 12, 25), utc(2000, 1, 1))),
    ],
)
def test_window_for_interval(
    start_time: str, interval: int, now: datetime, expected: tuple[datetime, datetime]
) -> None:
    assert monitoring_window(now, start_time, interval, tz=UTC) == Window(*expected)


@pytest.mark.parametrize("interval", [H, 2 * H, 3 * H, 12 * H, DAY, 2 * DAY, 5 * DAY, 7 * DAY])
@pytest.mark.parametrize("tz", [UTC, IST])
def test_windows_tile_time(interval: int, tz: tzinfo) -> None:
    now = utc(2024, 2, 27, 0, 7)
    for _ in range(200):
        win = monitoring_window(now, "09:15", interval, tz=tz)
        assert win.contains(now)
        assert win.end - win.start == timedelta(seconds=interval)
        assert (win.start.hour, win.start.minute) == (9, 15) or interval < DAY
        prev = previous_window(now, "09:15", interval, tz=tz)
        assert prev is not None and prev.end == win.start
        assert monitoring_window(win.end, "09:15", interval, tz=tz).start == win.end
        now += timedelta(minutes=97)


def test_reset_mid_window_clips_start() -> None:
    reset = utc(2024, 5, 6, 10, 17)
    win = monitoring_window(utc(2024, 5, 6, 12), "09:00", 12 * H, reset, tz=UTC)
    assert win == Window(reset, utc(2024, 5, 6, 21))


def test_collecting_since_before_window_does_not_clip() -> None:
    win = monitoring_window(utc(2024, 5, 6, 12), "09:00", 12 * H, utc(2024, 1, 1), tz=UTC)
    assert win == Window(utc(2024, 5, 6, 9), utc(2024, 5, 6, 21))


def test_collecting_since_in_the_future_clips_to_now() -> None:
    # The clock went back after a reset: the window must still hold now.
    now = utc(2024, 5, 6, 12)
    win = monitoring_window(now, "09:00", 12 * H, utc(2024, 5, 6, 15), tz=UTC)
    assert win == Window(now, utc(2024, 5, 6, 21))


def test_previous_window_clipped_by_reset_in_it() -> None:
    prev = previous_window(utc(2024, 5, 6, 22), "09:00", 12 * H, utc(2024, 5, 6, 10), tz=UTC)
    assert prev == Window(utc(2024, 5, 6, 10), utc(2024, 5, 6, 21))


@pytest.mark.parametrize(("start_time", "interval"), [("25:00", H), ("9", H), ("09:00", 5 * H)])
def test_bad_settings_are_refused(start_time: str, interval: int) -> None:
    with pytest.raises(InvalidArgument):
        monitoring_window(utc(2024, 5, 6), start_time, interval, tz=UTC)


@needs_tzdata
class TestDaylightSaving:
    """Europe/Berlin: 2024-03-31 02:00 → 03:00 and 2024-10-27 03:00 → 02:00."""

    def local(self, month: int, day: int, hour: int, minute: int = 0, fold: int = 0) -> datetime:
        return datetime(2024, month, day, hour, minute, tzinfo=BERLIN, fold=fold)

    def test_start_time_stays_on_the_wall_clock(self) -> None:
        before = monitoring_window(self.local(3, 30, 12), "09:00", 12 * H, tz=BERLIN)
        after = monitoring_window(self.local(4, 1, 12), "09:00", 12 * H, tz=BERLIN)
        assert before.start.hour == after.start.hour == 9
        assert before.start.utcoffset() == timedelta(hours=1)
        assert after.start.utcoffset() == timedelta(hours=2)

    def test_window_over_spring_change_is_shorter(self) -> None:
        win = monitoring_window(self.local(3, 31, 4), "09:00", 12 * H, tz=BERLIN)
        assert (win.start.day, win.start.hour, win.end.day, win.end.hour) == (30, 21, 31, 9)
        # Subtract in UTC: datetimes sharing a ZoneInfo subtract by wall clock (12 h here).
        assert win.end.astimezone(UTC) - win.start.astimezone(UTC) == timedelta(hours=11)

    def test_window_over_autumn_change_is_longer(self) -> None:
        now = self.local(10, 27, 2, 30, fold=1)  # the second 02:30
        win = monitoring_window(now, "09:00", 12 * H, tz=BERLIN)
        assert win.end.astimezone(UTC) - win.start.astimezone(UTC) == timedelta(hours=13)
        assert win.contains(now) and win.contains(self.local(10, 27, 2, 30))

    @pytest.mark.parametrize("day", [utc(2024, 3, 30, 22), utc(2024, 10, 26, 22)])
    @pytest.mark.parametrize("start_time", ["02:30", "02:00", "00:00"])
    def test_hourly_windows_hold_every_instant_across_the_change(
        self, day: datetime, start_time: str
    ) -> None:
        now = day
        seen: list[Window] = []
        while now < day + timedelta(hours=8):
            win = monitoring_window(now, start_time, H, tz=BERLIN)
            assert win.contains(now), (now, win)
            if not seen or seen[-1] != win:
                assert not seen or seen[-1].end == win.start
                seen.append(win)
            now += timedelta(minutes=5)
        lengths = {w.end.astimezone(UTC) - w.start.astimezone(UTC) for w in seen}
        assert lengths <= {timedelta(hours=1), timedelta(hours=2)}

    def test_contains_compares_instants_in_a_repeated_hour(self) -> None:
        # Datetimes sharing a ZoneInfo compare by wall clock; the window must not.
        second_hour = Window(self.local(10, 27, 2, fold=1), self.local(10, 27, 3))
        assert not second_hour.contains(self.local(10, 27, 2, 30, fold=0))
        assert second_hour.contains(self.local(10, 27, 2, 30, fold=1))

    def test_skipped_boundary_moves_forward(self) -> None:
        # 02:30 does not exist on 2024-03-31: the 01:30 window runs to 03:30 CEST, one hour.
        win = monitoring_window(utc(2024, 3, 31, 1), "02:30", H, tz=BERLIN)
        assert win.start == self.local(3, 31, 1, 30)
        assert win.end == self.local(3, 31, 3, 30)

    @pytest.fixture
    def host_in_berlin(self) -> Iterator[None]:
        if not hasattr(time, "tzset"):
            pytest.skip("time.tzset is not available")
        old = os.environ.get("TZ")
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()
        try:
            yield
        finally:
            if old is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = old
            time.tzset()

    @pytest.mark.usefixtures("host_in_berlin")
    def test_default_zone_is_the_hosts_with_its_dst_rules(self) -> None:
        winter = monitoring_window(utc(2024, 1, 10, 12), "09:00", 12 * H)
        summer = monitoring_window(utc(2024, 7, 10, 12), "09:00", 12 * H)
        assert winter.start == utc(2024, 1, 10, 8) and winter.start.hour == 9
        assert summer.start == utc(2024, 7, 10, 7) and summer.start.hour == 9


# --- statistics --------------------------------------------------------------------------

WIN = Window(utc(2024, 5, 6, 9), utc(2024, 5, 6, 21))


def ok(start: datetime, seconds: float, size: int) -> Cycle:
    return Cycle(start, start + timedelta(seconds=seconds), size, ok=True, missed=False, error=None)


def failed(start: datetime) -> Cycle:
    return Cycle(start, start + timedelta(seconds=5), 0, ok=False, missed=False, error="timeout")


def missed(start: datetime) -> Cycle:
    return Cycle(start, None, 0, ok=False, missed=True, error=None)


def test_statistics_of_mixed_cycles() -> None:
    cycles = [
        ok(utc(2024, 5, 6, 8, 59), 500, 10**9),  # before the window
        ok(WIN.start, 10, 100),  # at the start: inside
        ok(utc(2024, 5, 6, 10), 20, 200),
        failed(utc(2024, 5, 6, 11)),
        missed(utc(2024, 5, 6, 11, 5)),
        ok(utc(2024, 5, 6, 12), 40.5, 301),
        missed(utc(2024, 5, 6, 12, 5)),
        ok(WIN.end, 900, 10**9),  # at the end: the next window's
    ]
    stats = statistics(cycles, WIN)
    assert stats.average_replication_latency == pytest.approx(70.5 / 3)
    assert stats.missed_fraction == pytest.approx(2 / 6)
    assert stats == Stats(
        average_replication_size=200,  # 601 / 3, rounded
        maximum_replication_size=301,
        average_replication_latency=stats.average_replication_latency,
        maximum_replication_latency=40.5,
        successful_replication_count=3,
        missed_replication_count=2,
        replication_errors=1,
        missed_fraction=stats.missed_fraction,
    )
    assert stats.total_cycles == 6


def test_statistics_of_no_cycles() -> None:
    assert statistics([], WIN) == EMPTY_STATS
    assert statistics([ok(utc(2024, 5, 7), 1, 1)], WIN) == EMPTY_STATS
    assert EMPTY_STATS.total_cycles == 0


def test_statistics_without_success_have_no_sizes_or_latencies() -> None:
    stats = statistics([failed(utc(2024, 5, 6, 10)), missed(utc(2024, 5, 6, 11))], WIN)
    assert stats.average_replication_size is None and stats.maximum_replication_size is None
    assert stats.average_replication_latency is None
    assert stats.maximum_replication_latency is None
    assert (stats.successful_replication_count, stats.replication_errors) == (0, 1)
    assert stats.missed_fraction == 0.5


def test_statistics_compare_instants_not_wall_clocks() -> None:
    # 10:30 IST is 05:00 UTC, outside the window, although its wall clock is inside.
    assert statistics([ok(datetime(2024, 5, 6, 10, 30, tzinfo=IST), 1, 1)], WIN) == EMPTY_STATS


@pytest.mark.parametrize(
    "kwargs", [{"ok": True, "missed": True}, {"ok": True, "missed": False, "end": None}]
)
def test_inconsistent_cycle_is_refused(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"start": WIN.start, "end": WIN.end, "size": 1, "error": None}
    with pytest.raises(ValueError):
        Cycle(**(fields | kwargs))


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2024, 5, 6, 8), 0),
        (WIN.start, 0),
        (utc(2024, 5, 6, 9, 4, 59), 0),
        (utc(2024, 5, 6, 9, 5), 1),
        (utc(2024, 5, 6, 10), 12),
        (utc(2024, 5, 7), 144),
    ],
)
def test_expected_cycles(now: datetime, expected: int) -> None:
    assert expected_cycles(WIN, 300, now) == expected


T0 = utc(2024, 5, 6, 12)


@pytest.mark.parametrize(
    ("scheduled", "started", "frequency", "missed_count", "runs_at"),
    [
        (30, 70, 30, 2, 90),  # the brief's example: t=30 and t=60 skipped
        (30, 90, 30, 2, 90),  # counting from the moment it ran gives the same
        (30, 60, 30, 1, 60),
        (30, 30.001, 30, 1, 60),
        (30, 30, 30, 0, 30),
        (30, 10, 30, 0, 30),
        (0, 1000, 300, 4, 1200),
        (0, 900, 900, 1, 900),
    ],
)
def test_count_missed_and_next_cycle(
    scheduled: float, started: float, frequency: int, missed_count: int, runs_at: float
) -> None:
    due, free = T0 + timedelta(seconds=scheduled), T0 + timedelta(seconds=started)
    assert count_missed(due, free, frequency) == missed_count
    assert next_cycle_at(due, free, frequency) == T0 + timedelta(seconds=runs_at)


# --- health ------------------------------------------------------------------------------

NOW = utc(2024, 5, 6, 12)


def stats_with(missed_count: int, total: int) -> Stats:
    good = total - missed_count
    return Stats(1, 1, 1.0, 1.0, good, missed_count, 0, missed_count / total)


def health(**kwargs: Any) -> Health:
    fields: dict[str, Any] = {
        "mode": "Primary",
        "state": "Replicating",
        "now": NOW,
        "last_success": NOW - timedelta(minutes=5),
        "stats": stats_with(0, 100),
        "send_failure": None,
        "paused_on_replica": False,
        "failover_pending": False,
    }
    return evaluate(HealthInput(**(fields | kwargs)))


SEND = "the primary server cannot send replication data: the replica server vmhost1 is unreachable"
RESYNC = (
    "resynchronization required: change tracking was lost, so the primary server cannot send "
    "changes until a resynchronization runs"
)
ERROR = "replication stopped after an error; resume replication to retry"
PAUSED = "replication is paused on the replica server"


@pytest.mark.parametrize("mode", ["Primary", "Replica", "ExtendedReplica"])
def test_healthy(mode: str) -> None:
    assert health(mode=mode) == Health("Normal", [HEALTHY])
    assert health(mode=mode, stats=EMPTY_STATS, state="Resynchronizing").level == "Normal"


@pytest.mark.parametrize(
    ("mode", "state"), [("Primary", "Disabled"), ("TestReplica", "Replicating")]
)
def test_not_applicable(mode: str, state: str) -> None:
    assert health(mode=mode, state=state, last_success=None) == Health(None, [])


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"send_failure": "the replica server vmhost1 is unreachable"}, SEND),
        ({"state": "WaitingForStartResynchronize"}, RESYNC),
        ({"state": "Error"}, ERROR),
        ({"paused_on_replica": True}, PAUSED),
        ({"mode": "Replica", "state": "Suspended"}, PAUSED),
        ({"mode": "ExtendedReplica", "state": "Suspended"}, PAUSED),
        ({"mode": "Replica", "state": "Suspended", "paused_on_replica": True}, PAUSED),
    ],
)
def test_each_critical_rule_alone(kwargs: dict[str, Any], detail: str) -> None:
    assert health(**kwargs) == Health("Critical", [detail])


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        (
            {"stats": stats_with(21, 100)},
            "21% of replication cycles were missed in the monitoring window (21 of 100)",
        ),
        (
            {"stats": stats_with(1, 3)},
            "33.3% of replication cycles were missed in the monitoring window (1 of 3)",
        ),
        (
            {"last_success": NOW - timedelta(hours=2, minutes=5)},
            "no replication data was sent successfully for 2 h 5 min (more than 1 hour)",
        ),
        (
            {"mode": "Replica", "last_success": NOW - timedelta(hours=1, seconds=1)},
            "no replication data was received successfully for 1 h (more than 1 hour)",
        ),
        (
            {"last_success": NOW - timedelta(days=1, hours=3)},
            "no replication data was sent successfully for 1 d 3 h (more than 1 hour)",
        ),
        (
            {"state": "Resynchronizing", "last_success": NOW - timedelta(days=2, minutes=7)},
            "no replication data was sent successfully for 2 d 7 min (more than 1 hour)",
        ),
        ({"state": "ReadyForInitialReplication"}, "initial replication has not started yet"),
        (
            {"state": "InitialReplicationInProgress", "last_success": None},
            "initial replication is in progress and not finished yet",
        ),
        (
            {"mode": "Replica", "state": "WaitingForInitialReplication"},
            "the replica is waiting for initial replication to finish",
        ),
        (
            {"state": "PreparedForFailover"},
            "a planned failover was prepared and is not completed yet",
        ),
        (
            {"mode": "Replica", "state": "FailedOverWaitingCompletion"},
            "a failover was started and is not completed or cancelled yet",
        ),
        (
            {"failover_pending": True},
            "a failover was started and is not completed or cancelled yet",
        ),
        (
            {"mode": "Replica", "state": "FailedOver"},
            "the VM failed over and replication was not reversed: it is not protected",
        ),
        ({"state": "Suspended"}, "replication is suspended on the primary server"),
        (
            {"state": "ResynchronizeSuspended"},
            "resynchronization is suspended on the primary server",
        ),
    ],
)
def test_each_warning_rule_alone(kwargs: dict[str, Any], detail: str) -> None:
    assert health(**kwargs) == Health("Warning", [detail])


@pytest.mark.parametrize(
    ("missed_count", "level"), [(19, "Normal"), (20, "Normal"), (21, "Warning")]
)
def test_missed_threshold_is_more_than_20_percent(missed_count: int, level: str) -> None:
    assert health(stats=stats_with(missed_count, 100)).level == level
    assert health(stats=stats_with(missed_count * 10, 1000)).level == level


@pytest.mark.parametrize(("missed_count", "total"), [(201, 1000), (2017, 10080), (1, 4)])
def test_just_over_20_percent_warns(missed_count: int, total: int) -> None:
    assert health(stats=stats_with(missed_count, total)).level == "Warning"


def test_no_cycles_is_not_missing_cycles() -> None:
    assert health(stats=EMPTY_STATS).level == "Normal"


@pytest.mark.parametrize(
    ("age", "level"),
    [
        (timedelta(minutes=59), "Normal"),
        (timedelta(hours=1), "Normal"),
        (timedelta(hours=1, seconds=1), "Warning"),
    ],
)
def test_one_hour_boundary(age: timedelta, level: str) -> None:
    assert health(last_success=NOW - age).level == level
    assert health(mode="Replica", last_success=NOW - age).level == level


def test_last_success_age_compares_instants() -> None:
    # 13:30 IST is 08:00 UTC, four hours before NOW, though its wall clock looks later.
    assert health(last_success=datetime(2024, 5, 6, 13, 30, tzinfo=IST)).level == "Warning"


@pytest.mark.parametrize(
    "state",
    [
        "ReadyForInitialReplication",
        "InitialReplicationInProgress",
        "PreparedForFailover",
        "FailedOver",
    ],
)
def test_stale_rule_waits_for_replication_to_flow(state: str) -> None:
    details = health(state=state, last_success=NOW - timedelta(days=3)).details
    assert len(details) == 1 and "no replication data was" not in details[0]


def test_unknown_last_success_is_not_stale() -> None:
    assert health(last_success=None) == Health("Normal", [HEALTHY])


def test_all_firing_rules_are_listed_critical_first() -> None:
    result = health(
        state="Error",
        send_failure="the replica server vmhost1 is unreachable",
        stats=stats_with(50, 100),
        last_success=NOW - timedelta(hours=3),
        failover_pending=True,
    )
    assert result == Health(
        "Critical",
        [
            SEND,
            ERROR,
            "50% of replication cycles were missed in the monitoring window (50 of 100)",
            "no replication data was sent successfully for 3 h (more than 1 hour)",
            "a failover was started and is not completed or cancelled yet",
        ],
    )


def test_paused_replica_outranks_warnings() -> None:
    result = health(mode="Replica", state="Suspended", last_success=NOW - timedelta(hours=2))
    assert result == Health(
        "Critical",
        [PAUSED, "no replication data was received successfully for 2 h (more than 1 hour)"],
    )


def test_several_warnings_keep_rule_order() -> None:
    result = health(
        state="Suspended", stats=stats_with(30, 100), last_success=NOW - timedelta(hours=4)
    )
    assert result == Health(
        "Warning",
        [
            "30% of replication cycles were missed in the monitoring window (30 of 100)",
            "no replication data was sent successfully for 4 h (more than 1 hour)",
            "replication is suspended on the primary server",
        ],
    )


def test_resync_required_with_send_failure() -> None:
    result = health(state="WaitingForStartResynchronize", send_failure="the disk is full")
    assert result.level == "Critical"
    assert result.details == [
        "the primary server cannot send replication data: the disk is full",
        RESYNC,
    ]


@pytest.mark.parametrize(("mode", "state"), [("Secondary", "Replicating"), ("Primary", "Running")])
def test_unknown_mode_or_state_is_refused(mode: str, state: str) -> None:
    with pytest.raises(ValueError, match="unknown replication"):
        health(mode=mode, state=state)


def test_after_cycle_keeps_the_grid_and_counts_overruns() -> None:
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    on_time = after_cycle(t0, t0 + timedelta(seconds=5), 30)
    assert on_time == (t0 + timedelta(seconds=30), 0)
    # Busy until t=70: the periods at 30 and 60 are missed; the next runs at 90.
    late = after_cycle(t0, t0 + timedelta(seconds=70), 30)
    assert late == (t0 + timedelta(seconds=90), 2)
    exactly = after_cycle(t0, t0 + timedelta(seconds=30), 30)
    assert exactly == (t0 + timedelta(seconds=30), 0)
