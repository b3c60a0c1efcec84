"""Rates, schedules and the token bucket (bandwidth.py), the bucket on a virtual clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest

from vmreplica._internal import bandwidth
from vmreplica._internal.bandwidth import Schedule, TokenBucket, effective_rate, parse_rate
from vmreplica.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "bps"),
    [("0", 0), ("20M", 20_000_000), ("500k", 500_000), ("1.5G", 1_500_000_000), ("7", 7),
     ("10m", 10_000_000), ("2T", 2 * 10**12)],
)  # fmt: skip
def test_rates_are_bits_per_second_with_si_suffixes(text: str, bps: int) -> None:
    assert parse_rate(text) == bps
    assert parse_rate(bandwidth.format_rate(bps)) == bps


@pytest.mark.parametrize("text", ["", "fast", "-1M", "20 Mbit", "1e6", "20X", "11T", "1,5M"])
def test_bad_rates_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid --max-bandwidth") as e:
        parse_rate(text)
    assert "\n" not in e.value.message


MONDAY_9 = dt.datetime(2026, 11, 30, 9, 0)  # a Monday
SATURDAY_9 = dt.datetime(2026, 12, 5, 9, 0)


def test_the_first_matching_rule_wins() -> None:
    s = Schedule.parse("Mon-Fri 08:00-18:00=20M, *=0")
    assert s.rate_at(MONDAY_9) == 20_000_000
    assert s.rate_at(MONDAY_9.replace(hour=18)) == 0  # the end is not in the window
    assert s.rate_at(SATURDAY_9) == 0
    assert Schedule.parse("Sat 08:00-10:00=1M").rate_at(MONDAY_9) is None


def test_windows_past_midnight_belong_to_the_day_they_open() -> None:
    s = Schedule.parse("Fri 22:00-06:00=5M")
    friday_23 = dt.datetime(2026, 12, 4, 23, 0)
    assert s.rate_at(friday_23) == 5_000_000
    assert s.rate_at(friday_23 + dt.timedelta(hours=6)) == 5_000_000  # Saturday 05:00
    assert s.rate_at(friday_23 + dt.timedelta(hours=7)) is None  # Saturday 06:00
    assert s.rate_at(MONDAY_9.replace(hour=5)) is None  # Monday 05:00: Sunday did not open it
    week = Schedule.parse("Sat-Mon 00:00-24:00=1k")  # a range across the week's end
    assert week.rate_at(SATURDAY_9) == week.rate_at(MONDAY_9) == 1000
    assert week.rate_at(MONDAY_9 + dt.timedelta(days=1)) is None


@pytest.mark.parametrize(
    "text",
    ["Mon 08:00-18:00", "Mon-Fri=20M", "Funday 08:00-09:00=1M", "Mon 25:00-26:00=1M",
     "Mon 08:00-08:00=1M", "Mon 08:00-09:00=fast", "x" * 2000, "Mon 08:00-09:00=1M\n"],
)  # fmt: skip
def test_bad_schedules_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidArgument, match="bandwidth-schedule") as e:
        Schedule.parse(text)
    assert "\n" not in e.value.message


def test_the_schedule_overrides_the_plain_cap_where_a_rule_matches() -> None:
    assert effective_rate(10, None, MONDAY_9) == 10
    assert effective_rate(10, "Sat 00:00-24:00=0", MONDAY_9) == 10
    assert effective_rate(10, "Mon 00:00-24:00=0", MONDAY_9) == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def _chunks(total: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def test_the_bucket_holds_a_stream_to_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock.monotonic)
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    rate = [8_000_000]  # 1 MB/s
    vm, host = TokenBucket(lambda: rate[0]), TokenBucket(lambda: 0)

    async def run(total: int) -> list[int]:
        return [len(p) async for p in bandwidth.throttled(_chunks(total, 4 << 20), [vm, host])]

    pieces = asyncio.run(run(8 << 20))
    assert sum(pieces) == 8 << 20 and max(pieces) <= 100_000  # a tenth of a second each
    assert 8.0 <= clock.now <= 8.4  # 8.39 MB at 1 MB/s, less the first burst
    rate[0] = 0  # lifted: no more waiting
    before = clock.now
    asyncio.run(run(8 << 20))
    assert clock.now == before


def test_two_streams_share_one_host_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock.monotonic)
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    host = TokenBucket(lambda: 8_000_000)

    async def both() -> None:
        async def one() -> None:
            async for _ in bandwidth.throttled(_chunks(2 << 20, 1 << 20), [host]):
                pass

        await asyncio.gather(one(), one())

    asyncio.run(both())
    assert 4.0 <= clock.now <= 4.3  # 4 MiB through one 1 MB/s cap
