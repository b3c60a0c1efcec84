"""A node's membership of a cluster, and which VMs it owns (docs/CLUSTER.md).

Keys, under `/vmreplica/<cluster>/`:

- `config`: the cluster's settings (name, the broker's name), no lease;
- `nodes/<node>`: a live node, bound to its lease (`address`: where its agent listens);
- `vms/<vm>`: a VM the cluster keeps owned, no lease (the registry);
- `owners/<vm>`: the node owning it, bound to *that node's* lease: when the lease expires etcd
  deletes the key, and only then can another node create it again (`take`). A planned move
  (`move`) replaces the key in one transaction guarded by its value and revision.

The keepalive loop renews the lease every `ttl / 6` and feeds the `Fence`; a node whose lease is
gone (etcd says so) or whose deadline passed (no answer) owns nothing: `check` refuses, and
`on_fenced` runs once so the agent stops what it ran for its VMs. A lease found expired is
replaced by a new one; the node's VMs went back to the pool with the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.cluster.etcd import Etcd, EtcdUnavailable
from vmreplica._internal.cluster.fence import Fence, Fenced
from vmreplica._internal.cluster.storage_lock import LOCK_FILE, exclusive_async
from vmreplica.errors import InvalidState, NotFound

log = logging.getLogger("vmreplica.cluster")

# How long a write waits for the storage lock another node holds (a frozen former owner).
STORAGE_LOCK_TIMEOUT = 20.0

Hook = Callable[[str], Awaitable[None]]


def prefix(cluster: str) -> str:
    return f"/vmreplica/{cluster}/"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str
    lease_remaining: int  # seconds; -1: gone

    @property
    def healthy(self) -> bool:
        return self.lease_remaining > 0


async def nodes(etcd: Etcd, cluster: str) -> list[NodeInfo]:
    out = []
    for e in await etcd.get_prefix(prefix(cluster) + "nodes/"):
        info = json.loads(e.value)
        remaining = await etcd.lease_ttl(e.lease) if e.lease else -1
        out.append(NodeInfo(e.key.rsplit("/", 1)[1], str(info["address"]), remaining))
    return sorted(out, key=lambda n: n.name)


async def owners(etcd: Etcd, cluster: str) -> dict[str, str]:
    return {
        e.key.rsplit("/", 1)[1]: e.value.decode()
        for e in await etcd.get_prefix(prefix(cluster) + "owners/")
    }


class Member:
    def __init__(
        self, etcd: Etcd, cluster: str, node: str, address: Callable[[], str], ttl: int,
        *, on_acquired: Hook | None = None, on_fenced: Callable[[], Awaitable[None]] | None = None,
        can_take: Callable[[str, dict[str, Any]], bool] = lambda vm, info: True,
        on_settings: Callable[[dict[str, Any], int], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        self.etcd = etcd
        self.cluster = cluster
        self.node = node
        # Where this node's replication listener is, "HOST:PORT" ("" when it does not listen):
        # read again on every placement pass, since `server set` may change the port.
        self.address = address
        self._published_address = ""
        self.ttl = ttl
        self.fence = Fence(node)
        self.lease = 0
        self.owned: set[str] = set()
        self.on_acquired = on_acquired
        self.on_fenced = on_fenced
        # Whether this node can serve a VM (an agent: it has the VM's replica relationship).
        self.can_take = can_take
        self.on_settings = on_settings
        self.registry: dict[str, dict[str, Any]] = {}
        self._settings_revision = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._was_valid = False

    def _key(self, kind: str, name: str) -> str:
        return f"{prefix(self.cluster)}{kind}/{name}"

    async def join(self) -> None:
        """Register with a new lease; refuses a name that a live node holds."""
        if await self.etcd.get(prefix(self.cluster) + "config") is None:
            raise NotFound(f"no cluster {self.cluster} in etcd at {', '.join(self.etcd.endpoints)}")
        sent = time.monotonic()
        lease = await self.etcd.grant(self.ttl)
        address = self.address()
        body = json.dumps({"address": address}).encode()
        if not await self.etcd.create(self._key("nodes", self.node), body, lease):
            await self.etcd.revoke(lease)
            raise InvalidState(f"node {self.node} is already a live member of {self.cluster}")
        self.lease = lease
        self._published_address = address
        self.owned = set()
        self.fence.renewed(sent, self.ttl)
        self._was_valid = True

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keepalive(), name=f"cluster-keepalive-{self.node}"),
            asyncio.create_task(self._placement(), name=f"cluster-placement-{self.node}"),
        ]

    async def stop(self, *, leave: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if leave and self.lease:
            # Leaving on purpose frees this node's VMs at once instead of after the TTL.
            self.fence.lost()
            with contextlib.suppress(EtcdUnavailable):
                await self.etcd.revoke(self.lease)
        self.lease = 0
        self.owned = set()

    def check(self, vm: str, what: str) -> None:
        """Before every write for `vm` (an apply, a VM start): this node owns it, now."""
        self.fence.check(what)
        if vm not in self.owned:
            raise Fenced(f"node {self.node} does not own VM {vm}: refusing to {what}")

    @contextlib.asynccontextmanager
    async def writing(self, vm: str, storage: Path, what: str) -> AsyncIterator[None]:
        """The storage lock, then the check (the port's `writing`)."""
        async with exclusive_async(storage / LOCK_FILE, STORAGE_LOCK_TIMEOUT):
            self.check(vm, what)
            yield

    @contextlib.asynccontextmanager
    async def storage_held(self, storage: Path) -> AsyncIterator[None]:
        """The storage lock alone (the port's `storage_held`)."""
        async with exclusive_async(storage / LOCK_FILE, STORAGE_LOCK_TIMEOUT):
            yield

    async def _keepalive(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                ttl = await self.etcd.keepalive(self.lease)
            except Exception as e:
                # Whatever failed, the loop goes on: the fence runs out by itself meanwhile.
                log.warning("cluster lease keepalive failed: %s", e)
            else:
                if ttl > 0:
                    self.fence.renewed(sent, ttl)
                    self._was_valid = True
                else:
                    log.warning("cluster lease of %s expired: joining again", self.node)
                    self.fence.lost()
                    await self._fenced()
                    with contextlib.suppress(EtcdUnavailable, InvalidState):
                        await self.join()
            if self._was_valid and not self.fence.valid:
                await self._fenced()
            await asyncio.sleep(self.ttl / 6)

    async def _fenced(self) -> None:
        """Once per loss: forget every VM, and let the agent stop what it ran for them."""
        if not self._was_valid:
            return
        self._was_valid = False
        lost, self.owned = self.owned, set()
        log.warning("node %s fenced: dropping ownership of %s", self.node, sorted(lost))
        if self.on_fenced is not None:
            await self.on_fenced()

    async def _placement(self) -> None:
        """Take VMs nobody owns. Every node races with one `create` txn; the jitter spreads
        them, weighted by how many VMs this node owns already."""
        while True:
            await asyncio.sleep(self.ttl / 4 + random.uniform(0, 0.2) * (1 + len(self.owned)))
            try:
                await self._publish_address()
                await self._follow_settings()
                await self.refresh()
                if not self.fence.valid:
                    continue  # fenced: nothing to take until the lease is back
                taken = await owners(self.etcd, self.cluster)
                for vm, info in (await self.registered()).items():
                    if vm not in taken and self.can_take(vm, info):
                        await self.take(vm)
            except Exception as e:
                # The loop must outlive any one pass (a lease lost between the check and the
                # take, etcd gone): the next pass tries again.
                log.warning("cluster placement pass failed: %s", e)

    async def _publish_address(self) -> None:
        address = self.address()
        if address != self._published_address and self.fence.valid:
            body = json.dumps({"address": address}).encode()
            await self.etcd.put(self._key("nodes", self.node), body, self.lease)
            self._published_address = address

    async def owner_address(self, vm: str) -> tuple[str, str, int] | None:
        """The port's `owner_address`: another live node that owns `vm` and listens (None
        also when etcd does not answer: the caller's own ownership check decides then)."""
        try:
            return await self._owner_address(vm)
        except EtcdUnavailable:
            return None

    async def _owner_address(self, vm: str) -> tuple[str, str, int] | None:
        owner = await self.owner(vm)
        if owner is None or owner == self.node:
            return None
        entry = await self.etcd.get(self._key("nodes", owner))
        if entry is None:
            return None
        host, _, port = str(json.loads(entry.value).get("address", "")).rpartition(":")
        if not host or not port.isdigit() or int(port) == 0:
            return None
        return owner, host, int(port)

    async def settings(self) -> tuple[dict[str, Any] | None, int]:
        """The cluster's replication settings and authorization entries, and their revision."""
        entry = await self.etcd.get(prefix(self.cluster) + "settings")
        if entry is None:
            return None, 0
        value = json.loads(entry.value)
        return (value if isinstance(value, dict) else None), entry.mod_revision

    async def publish_settings(self, snapshot: dict[str, Any]) -> int:
        return await self.etcd.put(prefix(self.cluster) + "settings", json.dumps(snapshot).encode())

    async def _follow_settings(self) -> None:
        snapshot, revision = await self.settings()
        if snapshot is None or revision == self._settings_revision:
            return
        await faults.ahit("cluster.settings_read")
        if self.on_settings is not None:
            try:
                await self.on_settings(snapshot, revision)
            except Exception:
                # Not taken: tried again at the next pass (a storage location not mounted yet).
                log.exception("cannot apply the cluster's settings")
                return
        self._settings_revision = revision

    async def refresh(self) -> None:
        """The VMs etcd says this node owns, under its current lease."""
        if not self.fence.valid:
            return
        entries = await self.etcd.get_prefix(prefix(self.cluster) + "owners/")
        owned = {
            e.key.rsplit("/", 1)[1]
            for e in entries
            if e.value.decode() == self.node and e.lease == self.lease
        }
        # After a quorum loss the lease survives (etcd renews every lease when a new leader is
        # elected): the keys it guards are this node's again, and so is what they need running.
        new, self.owned = owned - self.owned, owned
        for vm in sorted(new):
            log.info("node %s owns VM %s again", self.node, vm)
            if self.on_acquired is not None:
                await self.on_acquired(vm)

    async def registered(self) -> dict[str, dict[str, Any]]:
        """The registry: each VM the cluster keeps owned, and what a node needs to serve it
        (`storage`: its replica storage directory, shared by the nodes)."""
        entries = await self.etcd.get_prefix(self._key("vms", ""))
        out = {}
        for e in entries:
            info = json.loads(e.value)
            out[e.key.rsplit("/", 1)[1]] = info if isinstance(info, dict) else {}
        self.registry = out
        return out

    async def register(self, vm: str, info: dict[str, str]) -> None:
        await self.etcd.put(self._key("vms", vm), json.dumps(info).encode())

    async def take(self, vm: str) -> bool:
        """Own `vm` if no node does (never owned, or its owner's lease expired): one txn."""
        self.fence.check(f"take VM {vm}")
        if not await self.etcd.create(self._key("owners", vm), self.node.encode(), self.lease):
            return False
        self.owned.add(vm)
        log.info("node %s took VM %s", self.node, vm)
        if self.on_acquired is not None:
            await self.on_acquired(vm)
        return True

    async def move(self, vm: str, to: str) -> None:
        """Give `vm` to node `to`, bound to that node's lease: one txn guarded by this node's
        ownership (value and revision of the key as read)."""
        self.check(vm, f"move VM {vm}")
        current = await self.etcd.get(self._key("owners", vm))
        target = await self.etcd.get(self._key("nodes", to))
        if target is None:
            raise NotFound(f"node {to} is not a live member of {self.cluster}")
        if current is None or current.value.decode() != self.node:
            raise Fenced(f"node {self.node} does not own VM {vm}")
        self.owned.discard(vm)
        if not await self.etcd.replace(current.key, current, to.encode(), target.lease):
            raise Fenced(f"VM {vm} changed owner during the move")

    def owns(self, vm: str) -> bool:
        return vm in self.owned

    def foreign(self, vm: str) -> bool:
        """The registry, as last read, holds `vm` and this node does not own it."""
        return vm in self.registry and vm not in self.owned

    async def live_nodes(self) -> list[str]:
        return [n.name for n in await nodes(self.etcd, self.cluster) if n.healthy]

    async def adopt(self, vm: str, storage: Path) -> None:
        """Register `vm` and own it, unless another node does (the port's `adopt`)."""
        await self.register(vm, {"storage": str(storage)})
        if vm in self.owned or await self.take(vm):
            return
        raise Fenced(f"VM {vm} is owned by node {await self.owner(vm)} of {self.cluster}")

    async def release(self, vm: str) -> None:
        self.owned.discard(vm)
        await self.etcd.delete(self._key("vms", vm))
        await self.etcd.delete(self._key("owners", vm))

    async def owner(self, vm: str) -> str | None:
        entry = await self.etcd.get(self._key("owners", vm))
        return None if entry is None else entry.value.decode()


async def create_cluster(etcd: Etcd, cluster: str, config: dict[str, object]) -> None:
    """`cluster init`: the cluster's config key, once."""
    if not await etcd.create(prefix(cluster) + "config", json.dumps(config).encode()):
        raise InvalidState(f"cluster {cluster} already exists in etcd")


async def cluster_config(etcd: Etcd, cluster: str) -> dict[str, object]:
    entry = await etcd.get(prefix(cluster) + "config")
    if entry is None:
        raise NotFound(f"no cluster {cluster} in etcd at {', '.join(etcd.endpoints)}")
    value = json.loads(entry.value)
    assert isinstance(value, dict)
    return value


async def set_cluster_config(etcd: Etcd, cluster: str, config: dict[str, object]) -> None:
    await etcd.put(prefix(cluster) + "config", json.dumps(config).encode())
