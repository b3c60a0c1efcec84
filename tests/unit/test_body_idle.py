"""A request body that stops arriving is a lost connection (api/body.py): given up after the
idle limit with a one-line error, while a body that keeps coming, however slowly, is read whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from vmreplica._internal.api.body import _idle_limited
from vmreplica.errors import ConnectionFailed


async def trickle(chunks: list[bytes], pause: float, then_hang: bool) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(pause)
        yield chunk
    if then_hang:
        await asyncio.Event().wait()


async def read_all(source: AsyncIterator[bytes], idle: float) -> bytes:
    return b"".join([chunk async for chunk in _idle_limited(source, idle)])


def test_a_slow_body_is_read_whole() -> None:
    parts = [b"a" * 10, b"b" * 10, b"c"]
    assert asyncio.run(read_all(trickle(parts, 0.05, False), idle=0.5)) == b"".join(parts)


def test_a_body_that_stops_arriving_is_a_lost_connection() -> None:
    async def scenario() -> None:
        got: list[bytes] = []
        with pytest.raises(ConnectionFailed, match=r"no data from the sender for 0.2 s"):
            async for chunk in _idle_limited(trickle([b"x", b"y"], 0.01, True), 0.2):
                got.append(chunk)
        assert got == [b"x", b"y"]

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_the_senders_sockets_give_up_a_dead_link_within_the_stall_timeout() -> None:
    """The other side of the same promise (transport/peer.py): unacknowledged data may wait at
    most STALL_TIMEOUT, and idle connections are probed."""
    import socket

    from vmreplica._internal.transport import peer

    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0))
    with peer._socket(info) as sock:
        tcp = socket.IPPROTO_TCP
        assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == peer.STALL_TIMEOUT * 1000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        idle, interval, count = (
            sock.getsockopt(tcp, o)
            for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
        )
        assert idle + interval * count <= peer.STALL_TIMEOUT
