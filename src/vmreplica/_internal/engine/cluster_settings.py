"""Replication settings and authorization entries set once for the whole cluster.

Hyper-V's broker keeps them cluster-wide. Here any node's `server set` and `auth new|set|remove`
(so `-c` naming any node, or the broker name) publishes a snapshot to etcd through the cluster
port, and every node applies the newest snapshot it sees (`apply`), without publishing it again.
Concurrent changes on two nodes: the later publication wins, whole. On one node, a change and
its publication are one step against `apply` (`changing`), and a snapshot older than this node's
own newest publication is never applied: read before a local change but applied after it, it
would undo that change here and, with this node's next publication, in the whole cluster. Ports
and the listener's certificate files stay each node's own: on one address, two nodes cannot
share a port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from vmreplica._internal.engine.authorization import AuthorizationService
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.server_settings import ServerService

CLUSTER_WIDE = (
    "replication_enabled",
    "allowed_authentication_type",
    "replication_allowed_from_any_server",
    "default_storage_location",
    "monitoring_interval",
    "monitoring_start_time",
    "max_bandwidth",
    "bandwidth_schedule",
)


class ClusterSettings:
    def __init__(self, ctx: Context, server: ServerService, auth: AuthorizationService) -> None:
        self._ctx = ctx
        self._server = server
        self._auth = auth
        self._lock = asyncio.Lock()
        self._published = 0  # the etcd revision of this node's newest publication

    def snapshot(self) -> dict[str, Any]:
        raw = self._server.raw()
        return {
            "server": {k: raw[k] for k in CLUSTER_WIDE},
            "auth": [list(e) for e in self._auth.entries()],
        }

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Around a change of this node's settings or entries: once it succeeded, the
        cluster's copy becomes this node's; no `apply` runs meanwhile."""
        async with self._lock:
            yield
            await self._publish()

    async def publish(self) -> None:
        """This node's settings become the cluster's (the first node of a cluster)."""
        async with self._lock:
            await self._publish()

    async def _publish(self) -> None:
        if self._ctx.cluster is not None:
            self._published = await self._ctx.cluster.publish_settings(self.snapshot())

    async def apply(self, snapshot: dict[str, Any], revision: int) -> None:
        """A snapshot another node published, at etcd `revision`: servers settings first (an
        entry may need `--any-server false`), then the entries."""
        async with self._lock:
            if revision > self._published and snapshot != self.snapshot():
                await self._apply(snapshot)

    async def _apply(self, snapshot: dict[str, Any]) -> None:
        server = snapshot.get("server", {})
        await self._server.apply_values({k: server[k] for k in CLUSTER_WIDE if k in server})
        self._auth.replace_all([(str(a), str(b), str(c)) for a, b, c in snapshot.get("auth", [])])
