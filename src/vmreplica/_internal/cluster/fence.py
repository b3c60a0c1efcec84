"""Fencing by lease expiry, locally: when may this node still act as an owner? (pure)

etcd expires a lease `ttl` seconds after the last keepalive it received, and only then can
another node take over what the lease guarded. This node counts from the moment it *sent* the
keepalive that etcd answered (earlier than etcd's receipt, so never later than etcd's own count)
and stops at `SAFE_FRACTION` of the TTL: the rest is the margin for clock-rate differences and
for an apply that passed its check just before the deadline. A keepalive that fails or is
overdue does not extend anything; the deadline simply passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmreplica.errors import InvalidState

SAFE_FRACTION = 2 / 3


class Fenced(InvalidState):
    """This node no longer holds its cluster lease (or never did): it must not write."""


@dataclass
class Fence:
    node: str
    clock: Callable[[], float] = time.monotonic
    _valid_until: float = field(default=0.0, init=False)

    def renewed(self, sent_at: float, ttl: float) -> None:
        """etcd answered a keepalive sent at `sent_at` (this clock) with `ttl` seconds."""
        if ttl <= 0:
            self.lost()
            return
        # Never move the deadline back: an old answer arriving late says nothing new.
        self._valid_until = max(self._valid_until, sent_at + ttl * SAFE_FRACTION)

    def lost(self) -> None:
        self._valid_until = 0.0

    @property
    def remaining(self) -> float:
        return max(0.0, self._valid_until - self.clock())

    @property
    def valid(self) -> bool:
        return self.clock() < self._valid_until

    def check(self, what: str) -> None:
        if not self.valid:
            raise Fenced(
                f"node {self.node} holds no valid cluster lease: refusing to {what} "
                "(another node may own it now)"
            )
