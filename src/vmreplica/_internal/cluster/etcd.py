"""etcd v3, through aetcd: the only module that imports it.

What the cluster needs of etcd is small: leases (grant, keep alive, revoke, remaining time), keys
bound to a lease, reads by prefix, and transactions that compare a key's existence, value and
revision. Each call carries a short deadline (`timeout`) so that a member without a quorum
makes the call fail instead of hanging, and a failed call moves to the next endpoint: aetcd
talks to one endpoint per client. Every failure leaves here as :class:`EtcdUnavailable`, one
line naming the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]
import aetcd.exceptions  # type: ignore[import-untyped]

from vmreplica.errors import ConnectionFailed, InvalidArgument

T = TypeVar("T")

# A request to a member that lost its quorum waits for a leader; past this, try the next one.
DEFAULT_TIMEOUT = 2.0


class EtcdUnavailable(ConnectionFailed):
    """No endpoint answered within its deadline (down, or no quorum)."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    lease: int  # 0: the key outlives every node
    create_revision: int
    mod_revision: int


def parse_endpoints(value: str) -> tuple[str, ...]:
    """`http://host:port[,…]` → the endpoints, checked (one-line errors, nothing changed)."""
    endpoints = tuple(v.strip() for v in value.split(",") if v.strip())
    if not endpoints:
        raise InvalidArgument("--etcd: give at least one URL, e.g. http://10.0.0.1:2379")
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path:
            raise InvalidArgument(f"--etcd: {url!r} is not http://HOST:PORT")
    return endpoints


class Etcd:
    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._current = 0
        self._client: aetcd.Client | None = None
        self._closing: set[asyncio.Future[None]] = set()

    def _connect(self) -> aetcd.Client:
        if self._client is None:
            parts = urlsplit(self.endpoints[self._current])
            self._client = aetcd.Client(host=parts.hostname, port=parts.port, timeout=self.timeout)
        return self._client

    def _drop(self, failed: aetcd.Client) -> None:
        # Closing a gRPC channel cancels every call on it, and another task (the keepalive
        # loop) may be in one: only forget it here; it closes once no call can still be on it.
        if self._client is failed:
            self._client = None
            self._current = (self._current + 1) % len(self.endpoints)
            self._closing.add(asyncio.ensure_future(self._close_later(failed)))

    async def _close_later(self, client: aetcd.Client) -> None:
        await asyncio.sleep(self.timeout * 2)
        with contextlib.suppress(Exception):
            await client.close()

    async def _call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        last: Exception | None = None
        for _ in self.endpoints:
            client = self._connect()
            try:
                return await op(client)
            except (aetcd.exceptions.ClientError, TimeoutError) as e:
                # Unreachable, or "context deadline exceeded" from a member without a leader:
                # either way, the next endpoint may have the quorum.
                last = e
                self._drop(client)
        raise EtcdUnavailable(
            f"etcd did not answer at {', '.join(self.endpoints)} "
            f"(down, or no quorum): {type(last).__name__}: {last}"
        )

    async def close(self) -> None:
        for task in self._closing:
            task.cancel()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # Leases.

    async def grant(self, ttl: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl))
        return int(lease.id)

    async def keepalive(self, lease: int) -> int:
        """One keepalive; the TTL etcd granted from now, 0 if the lease is gone."""
        reply = await self._call(lambda c: c.refresh_lease(lease))
        return max(0, int(reply.TTL)) if reply is not None else 0

    async def lease_ttl(self, lease: int) -> int:
        """Remaining seconds of a lease; -1: it does not exist (expired or revoked)."""
        info = await self._call(lambda c: c.get_lease_info(lease, keys=False))
        return int(info.TTL)

    async def revoke(self, lease: int) -> None:
        await self._call(lambda c: c.revoke_lease(lease))

    # Keys.

    async def get(self, key: str) -> Entry | None:
        kv = await self._call(lambda c: c.get(key.encode()))
        return None if kv is None else _entry(kv)

    async def get_prefix(self, prefix: str) -> list[Entry]:
        kvs = await self._call(lambda c: c.get_prefix(prefix.encode()))
        return [_entry(kv) for kv in kvs]

    async def put(self, key: str, value: bytes, lease: int = 0) -> None:
        await self._call(lambda c: c.put(key.encode(), value, lease=lease or None))

    async def delete(self, key: str) -> None:
        await self._call(lambda c: c.delete(key.encode()))

    async def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put `key` only if it does not exist (never created, or deleted with its lease)."""

        async def op(c: aetcd.Client) -> bool:
            ok, _ = await c.transaction(
                compare=[c.transactions.create(key.encode()) == 0],
                success=[c.transactions.put(key.encode(), value, lease=lease or None)],
                failure=[],
            )
            return bool(ok)

        return await self._call(op)

    async def replace(self, key: str, expect: Entry, value: bytes, lease: int) -> bool:
        """Put `key` only if it is still exactly `expect` (same value, not modified since),
        in one txn: a concurrent change or the key's deletion with its lease makes it fail."""

        async def op(c: aetcd.Client) -> bool:
            ok, _ = await c.transaction(
                compare=[
                    c.transactions.value(key.encode()) == expect.value,
                    c.transactions.mod(key.encode()) == expect.mod_revision,
                ],
                success=[c.transactions.put(key.encode(), value, lease=lease or None)],
                failure=[],
            )
            return bool(ok)

        return await self._call(op)

    async def members(self) -> list[tuple[str, list[str]]]:
        """The etcd members: name and client URLs (for `cluster get`)."""

        async def op(c: aetcd.Client) -> list[tuple[str, list[str]]]:
            return [(m.name, list(m.client_urls)) async for m in c.members()]

        return await self._call(op)


def _entry(kv: object) -> Entry:
    return Entry(
        key=bytes(kv.key).decode(),  # type: ignore[attr-defined]
        value=bytes(kv.value),  # type: ignore[attr-defined]
        lease=int(kv.lease),  # type: ignore[attr-defined]
        create_revision=int(kv.create_revision),  # type: ignore[attr-defined]
        mod_revision=int(kv.mod_revision),  # type: ignore[attr-defined]
    )
