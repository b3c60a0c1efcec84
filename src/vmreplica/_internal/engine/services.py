"""The engine, assembled: every service of one host, wired to each other once, here."""

from __future__ import annotations

import dataclasses

from vmreplica._internal.engine import primary as primary_side
from vmreplica._internal.engine import replica as replica_side
from vmreplica._internal.engine.authorization import AuthorizationService
from vmreplica._internal.engine.cluster_settings import ClusterSettings
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.failover import FailoverService
from vmreplica._internal.engine.relationships import ReplicationService
from vmreplica._internal.engine.server_settings import ServerService
from vmreplica._internal.engine.vms import VmService


@dataclasses.dataclass(frozen=True)
class Services:
    ctx: Context
    server: ServerService
    auth: AuthorizationService
    vms: VmService
    primary: primary_side.Primary
    replica: replica_side.Replica
    failover: FailoverService
    replication: ReplicationService
    cluster_settings: ClusterSettings

    async def recover(self) -> None:
        """At start-up, before any request: definitions, running VMs, then every journal entry
        (each kind by the part that owns it; one that fails never stops the rest)."""
        await self.vms.recover_definitions()
        await self.vms.runtime.recover()
        await self.vms.adopt_defined()
        await self.ctx.journal.recover("fsfreeze")  # a guest left frozen thaws first
        await self.ctx.journal.recover("delete-storage", "seed-adopt", "media-import")
        await self.replica.recovery.recover()
        await self.ctx.journal.recover(
            "become-replica", "reverse", "failover", "test-failover", "failover-complete"
        )


def build(ctx: Context) -> Services:
    server = ServerService(ctx)
    auth = AuthorizationService(ctx, server)
    vms = VmService(ctx)
    primary = primary_side.build(ctx, vms)
    replica = replica_side.build(ctx, vms)
    failover = FailoverService(ctx, vms, primary, replica)
    replication = ReplicationService(ctx, server, auth, vms, primary, replica)
    cluster_settings = ClusterSettings(ctx, server, auth)
    return Services(
        ctx, server, auth, vms, primary, replica, failover, replication, cluster_settings
    )
