"""etcd v3, through its JSON gateway (`/v3/…`) over aiohttp: the only module that speaks to etcd.

Why not a gRPC client (aetcd): grpcio from 1.80 on makes a forked child crash ("Check failure
stack trace") while the parent holds an active channel (grpc/grpc#43055), and the agent forks
qemu-img and QEMU all the time with a `preexec_fn` (which rules out vfork/posix_spawn): every
`qemu-img info` of the replica failed in the first test with an agent. The gateway is part of
etcd itself (3.4 and later), the same API in protobuf's JSON mapping (bytes in base64, int64 as
strings), and aiohttp is already the agent's HTTP library.

What the cluster needs of etcd is small: leases (grant, keep alive, revoke, remaining time), keys
bound to a lease, reads by prefix, and transactions that compare a key's existence, value and
revision. Each call carries a short deadline (`timeout`) so that a member without a quorum
makes the call fail instead of hanging, and a failed call moves to the next endpoint. Every
failure leaves here as :class:`EtcdUnavailable`, one line naming the endpoints.

`https://` endpoints take `ssl`, a client context (:func:`ssl_context`): etcd is verified against
the cluster's CA and this node presents its client certificate (etcd's `--client-cert-auth`). A
TLS failure (a certificate etcd does not trust, or one this node does not) says so in that line.
"""

from __future__ import annotations

import base64
import ssl as _ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vmreplica._internal import certs
from vmreplica.errors import ConnectionFailed

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


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _put(key: str, value: bytes, lease: int) -> dict[str, Any]:
    return {"key": _b64(key), "value": _b64(value)} | ({"lease": str(lease)} if lease else {})


def ssl_context(ca: str | Path, cert: str | Path, key: str | Path) -> _ssl.SSLContext:
    """Mutual TLS to etcd: trust only `ca`, present `cert`/`key` (one-line errors on bad files)."""
    return certs.etcd_client_ssl_context(ca, cert, key)


def _tls_failure(e: BaseException) -> bool:
    """A refused handshake: ours (etcd's certificate) or etcd's (our certificate, or none)."""
    if isinstance(e, aiohttp.ClientSSLError):
        return True
    text = str(e)
    return any(w in text for w in ("SSL", "CERTIFICATE", "certificate", "TLS"))


class Etcd:
    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        *,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self.ssl = ssl
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def authenticated(self) -> bool:
        """Every endpoint is https with a client certificate (otherwise anyone who reaches
        etcd's port can rewrite the cluster: docs/CLUSTER.md, "Security")."""
        return self.ssl is not None and all(u.startswith("https://") for u in self.endpoints)

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # An http:// endpoint ignores the context; https:// without one uses the
                # system's CAs (config refuses that combination).
                connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else True),
            )
        last, tls = "", False
        for _ in self.endpoints:
            url = self.endpoints[self._current] + path
            try:
                async with self._session.post(url, json=body) as r:
                    answer = await r.json(content_type=None)
                    if r.status == 200 and isinstance(answer, dict) and "error" not in answer:
                        return answer
                    # A member without a leader answers "context deadline exceeded" or
                    # "no leader": the next endpoint may have the quorum.
                    last = f"HTTP {r.status}: {answer.get('error', answer) if isinstance(answer, dict) else answer}"
            except (aiohttp.ClientError, TimeoutError, ValueError, _ssl.SSLError) as e:
                last = " ".join(f"{type(e).__name__}: {e}".split())
                tls = tls or _tls_failure(e)
            self._current = (self._current + 1) % len(self.endpoints)
        if tls:
            raise EtcdUnavailable(
                f"etcd at {', '.join(self.endpoints)}: TLS refused (is etcd_cert issued by the CA "
                f"etcd trusts, and etcd's certificate by etcd_ca?): {last}"
            )
        raise EtcdUnavailable(
            f"etcd did not answer at {', '.join(self.endpoints)} (down, or no quorum): {last}"
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # Leases.

    async def grant(self, ttl: int) -> int:
        answer = await self._call("/v3/lease/grant", {"TTL": ttl})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """One keepalive; the TTL etcd granted from now, 0 if the lease is gone."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return max(0, int(answer.get("result", {}).get("TTL", 0)))

    async def lease_ttl(self, lease: int) -> int:
        """Remaining seconds of a lease; -1: it does not exist (expired or revoked)."""
        answer = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # Keys.

    async def get(self, key: str) -> Entry | None:
        kvs = (await self._call("/v3/kv/range", {"key": _b64(key)})).get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> list[Entry]:
        body = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        return [_entry(kv) for kv in (await self._call("/v3/kv/range", body)).get("kvs", [])]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Put `key`; the revision of the store that holds it."""
        answer = await self._call("/v3/kv/put", _put(key, value, lease))
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put `key` only if it does not exist (never created, or deleted with its lease)."""
        compare = [
            {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        ]
        return await self._txn(compare, _put(key, value, lease))

    async def replace(self, key: str, expect: Entry, value: bytes, lease: int) -> bool:
        """Put `key` only if it is still exactly `expect` (same value, not modified since),
        in one txn: a concurrent change or the key's deletion with its lease makes it fail."""
        compare = [
            {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(expect.value)},
            {"key": _b64(key), "target": "MOD", "result": "EQUAL",
             "mod_revision": str(expect.mod_revision)},
        ]  # fmt: skip
        return await self._txn(compare, _put(key, value, lease))

    async def _txn(self, compare: list[dict[str, Any]], put: dict[str, Any]) -> bool:
        answer = await self._call(
            "/v3/kv/txn", {"compare": compare, "success": [{"request_put": put}]}
        )
        # protobuf's JSON leaves out a false `succeeded`.
        return bool(answer.get("succeeded", False))

    async def members(self) -> list[tuple[str, list[str]]]:
        """The etcd members: name and client URLs (for `cluster get`)."""
        answer = await self._call("/v3/cluster/member/list", {})
        return [(str(m.get("name", "")), list(m.get("clientURLs", []))) for m in answer["members"]]


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=base64.b64decode(kv["key"]).decode(),
        value=base64.b64decode(kv.get("value", "")),
        lease=int(kv.get("lease", 0)),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
    )
