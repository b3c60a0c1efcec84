"""Bandwidth limits: rates as links are sold (bits per second, SI suffixes), schedules of them by
day and time, and the token bucket that holds a stream to them.

A rate is ``0`` (unlimited) or a number with an optional suffix ``k``, ``M``, ``G`` or ``T``
(powers of 1000): ``20M`` is 20,000,000 bit/s. A schedule is a comma-separated list of rules,
the first that matches wins: ``DAYS HH:MM-HH:MM=RATE`` (``DAYS`` one day or a range such as
``Mon-Fri``; the end of the window may be past midnight) or ``*=RATE``. Where no rule matches,
the plain ``--max-bandwidth`` applies. Times are the host's local time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from vmreplica.errors import InvalidArgument

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RATE = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)")
_RULE = re.compile(r"(?:(\w+)(?:-(\w+))?\s+(\d\d):(\d\d)-(\d\d):(\d\d)|\*)\s*=\s*(\S+)")
MAX_RATE = 10**13  # 10 Tbit/s: anything above is a typo
MAX_SCHEDULE = 1000


def parse_rate(text: str, what: str = "--max-bandwidth") -> int:
    """Bits per second; 0 is unlimited."""
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise InvalidArgument(
            f"invalid {what} {text[:40]!r}: use bits per second such as 20M, 500k or 0 (unlimited)"
        )
    rate = int(float(found[1]) * _SUFFIX[found[2].lower()])
    if rate > MAX_RATE:
        raise InvalidArgument(f"invalid {what} {text[:40]!r}: more than 10T")
    return rate


def format_rate(bps: int) -> str:
    for suffix, unit in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bps >= unit and bps % unit == 0:
            return f"{bps // unit}{suffix}"
    return str(bps)


@dataclass(frozen=True)
class Rule:
    days: frozenset[int] | None  # None: "*", any time
    start: int = 0  # minutes after midnight
    end: int = 0
    rate: int = 0

    def matches(self, when: dt.datetime) -> bool:
        if self.days is None:
            return True
        minute = when.hour * 60 + when.minute
        if self.start < self.end:
            return when.weekday() in self.days and self.start <= minute < self.end
        # past midnight: the part after midnight belongs to the day the window opened
        if minute >= self.start:
            return when.weekday() in self.days
        yesterday = (when.weekday() - 1) % 7
        return minute < self.end and yesterday in self.days


def _day(name: str, spec: str) -> int:
    try:
        return DAYS.index(name.lower()[:3]) if len(name) >= 3 else DAYS.index(name)
    except ValueError:
        raise InvalidArgument(
            f"invalid --bandwidth-schedule rule {spec!r}: {name!r} is not a day (Mon … Sun)"
        ) from None


def _minutes(hours: str, minutes: str, spec: str) -> int:
    h, m = int(hours), int(minutes)
    if h > 24 or m > 59 or (h == 24 and m):
        raise InvalidArgument(f"invalid --bandwidth-schedule rule {spec!r}: bad time {h}:{m:02}")
    return h * 60 + m


@dataclass(frozen=True)
class Schedule:
    rules: tuple[Rule, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Schedule:
        if len(text) > MAX_SCHEDULE or not text.isprintable():
            raise InvalidArgument("invalid --bandwidth-schedule: too long or not printable")
        rules = []
        for spec in (s.strip() for s in text.split(",")):
            found = _RULE.fullmatch(spec)
            if found is None:
                raise InvalidArgument(
                    f"invalid --bandwidth-schedule rule {spec!r}: use DAYS HH:MM-HH:MM=RATE "
                    "(e.g. Mon-Fri 08:00-18:00=20M) or *=RATE"
                )
            rate = parse_rate(found[7], "--bandwidth-schedule rate")
            if found[1] is None:
                rules.append(Rule(None, rate=rate))
                continue
            first = _day(found[1], spec)
            last = _day(found[2], spec) if found[2] else first
            days = frozenset((first + i) % 7 for i in range((last - first) % 7 + 1))
            start, end = _minutes(found[3], found[4], spec), _minutes(found[5], found[6], spec)
            if start == end:
                raise InvalidArgument(f"invalid --bandwidth-schedule rule {spec!r}: empty window")
            rules.append(Rule(days, start, end, rate))
        return cls(tuple(rules), text.strip())

    def rate_at(self, when: dt.datetime) -> int | None:
        """The rate of the first rule that matches, None where none does."""
        return next((r.rate for r in self.rules if r.matches(when)), None)


def effective_rate(max_bandwidth: int, schedule: str | None, when: dt.datetime) -> int:
    """Bits per second now (0: unlimited)."""
    scheduled = Schedule.parse(schedule).rate_at(when) if schedule else None
    return max_bandwidth if scheduled is None else scheduled


class TokenBucket:
    """Bytes per second from a rate in bits per second that may change at any time (0: no
    limit); bursts of at most a tenth of a second's worth."""

    def __init__(self, rate: Callable[[], int]) -> None:
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def piece_size(self) -> int:
        """How large a piece of a stream may be for the limit to hold it evenly."""
        bps = self._rate()
        return max(16 << 10, bps // 8 // 10) if bps else 1 << 30

    async def take(self, n: int) -> None:
        async with self._lock:  # waiters are served in turn: streams share the rate fairly
            while True:
                bps = self._rate()
                now = time.monotonic()
                if not bps:
                    self._tokens, self._stamp = 0.0, now
                    return
                rate = bps / 8
                self._tokens = min(rate / 10, self._tokens + (now - self._stamp) * rate)
                self._stamp = now
                need = min(n, rate / 10)  # a piece larger than the burst borrows from the future
                if self._tokens >= need - 1:
                    self._tokens -= n
                    return
                # at least a millisecond: float steps smaller than that would never arrive
                await asyncio.sleep(min(1.0, max(0.001, (need - self._tokens) / rate)))


async def throttled(
    chunks: AsyncIterable[bytes], buckets: Sequence[TokenBucket]
) -> AsyncIterator[bytes]:
    """The stream, in pieces small enough for every bucket, each let through by all of them."""
    async for chunk in chunks:
        size = min(b.piece_size() for b in buckets) if buckets else len(chunk) or 1
        for i in range(0, len(chunk), size):
            piece = chunk[i : i + size]
            for bucket in buckets:
                await bucket.take(len(piece))
            yield piece
