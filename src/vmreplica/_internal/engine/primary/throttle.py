"""Bandwidth limits on what this host sends (``server set --max-bandwidth/--bandwidth-schedule``
for the host, ``replication set`` for a VM): deltas and resynchronization blocks pass through
the VM's token bucket and the host's, which every VM shares; an initial copy, which QEMU moves,
gets the smaller of the two rates as QEMU's own throttle when it starts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import datetime

from vmreplica._internal.bandwidth import TokenBucket, effective_rate, throttled
from vmreplica._internal.engine.context import Context

_FRESH = 1.0  # seconds a rate is reused before the settings and the clock are read again


class Throttle:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._cache: dict[str, tuple[float, int]] = {}
        self._host = TokenBucket(lambda: self._cached("", self._host_rate))
        self._vms: dict[str, TokenBucket] = {}

    def _cached(self, key: str, compute: Callable[[], int]) -> int:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is None or now - hit[0] > _FRESH:
            hit = (now, compute())
            self._cache[key] = hit
        return hit[1]

    def _host_rate(self) -> int:
        settings = self._ctx.stores.settings
        schedule = settings.get("server.bandwidth_schedule", None)
        return effective_rate(
            int(str(settings.get("server.max_bandwidth", 0))),
            None if schedule is None else str(schedule),
            datetime.now(),
        )

    def _vm_rate(self, vm_id: str) -> int:
        row = self._ctx.stores.replications.find(vm_id)
        if row is None:
            return 0
        s = row.settings
        return effective_rate(s.max_bandwidth, s.bandwidth_schedule, datetime.now())

    def stream(self, vm_id: str, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """A VM's stream held to its own rate and the host's."""
        # A new stream reads the settings afresh: a cap set just before a cycle (`server set`,
        # `replication set`) holds it from its first byte, not only after _FRESH.
        self._cache.pop(vm_id, None)
        self._cache.pop("", None)
        bucket = self._vms.get(vm_id)
        if bucket is None:
            bucket = TokenBucket(lambda: self._cached(vm_id, lambda: self._vm_rate(vm_id)))
            self._vms[vm_id] = bucket
        return throttled(chunks, [bucket, self._host])

    def copy_rate(self, vm_id: str) -> int:
        """Bytes per second for a copy outside the buckets (0: unlimited)."""
        rates = [r for r in (self._vm_rate(vm_id), self._host_rate()) if r]
        return min(rates) // 8 if rates else 0
