"""Wall-clock laps of a multi-step operation, for the one log line that says where its time
went (the initial copy's prepare / copy / finish, and the steps inside them)."""

from __future__ import annotations

import time


class Laps:
    def __init__(self) -> None:
        self._last = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> float:
        """End the lap running since the last one (or the start) as ``name``; its seconds."""
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        self._laps.append((name, seconds))
        return seconds

    def __getitem__(self, name: str) -> float:
        return sum(s for n, s in self._laps if n == name)

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._laps)
