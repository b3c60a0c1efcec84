"""Replication settings and authorization entries set once for the whole cluster.

Hyper-V's broker keeps them cluster-wide. Here any node's `server set` and `auth new|set|remove`
(so `-c` naming any node, or the broker name) publishes a snapshot to etcd through the cluster
port, and every node applies the newest snapshot it sees (`apply`), without publishing it again.
Concurrent changes on two nodes: the later publication wins, whole. Ports and the listener's
certificate files stay each node's own: on one address, two nodes cannot share a port.
"""

from __future__ import annotations

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

    def snapshot(self) -> dict[str, Any]:
        raw = self._server.raw()
        return {
            "server": {k: raw[k] for k in CLUSTER_WIDE},
            "auth": [list(e) for e in self._auth.entries()],
        }

    async def publish(self) -> None:
        """After a change on this node: the cluster's copy becomes this node's."""
        if self._ctx.cluster is not None:
            await self._ctx.cluster.publish_settings(self.snapshot())

    async def apply(self, snapshot: dict[str, Any]) -> None:
        """A snapshot another node published: servers settings first (an entry may need
        `--any-server false`), then the entries."""
        if snapshot == self.snapshot():
            return
        server = snapshot.get("server", {})
        await self._server.apply_values({k: server[k] for k in CLUSTER_WIDE if k in server})
        self._auth.replace_all([(str(a), str(b), str(c)) for a, b, c in snapshot.get("auth", [])])
