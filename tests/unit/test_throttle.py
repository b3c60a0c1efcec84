"""A cap set just before a cycle holds that cycle from its first byte (engine/primary/throttle.py
reuses a rate for a second within a stream, never from one stream to the next)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary.throttle import Throttle

MBIT = 1_000_000


class Settings:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any) -> Any:
        return self.values.get(key, default)


class NoRelationships:
    def find(self, vm_id: str) -> None:
        return None


async def nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def test_a_host_cap_set_between_two_streams_holds_the_second_at_once() -> None:
    settings = Settings()
    ctx = cast(Context, SimpleNamespace(
        stores=SimpleNamespace(settings=settings, replications=NoRelationships())
    ))  # fmt: skip
    throttle = Throttle(ctx)
    throttle.stream("vm", nothing())
    host = throttle._host  # the bucket every VM's stream shares
    assert host.piece_size() == 1 << 30  # no cap: read now, and reused for a second
    settings.values["server.max_bandwidth"] = 24 * MBIT
    assert host.piece_size() == 1 << 30  # within the stream, the rate read a moment ago
    throttle.stream("vm", nothing())
    assert host.piece_size() == 24 * MBIT // 8 // 10
