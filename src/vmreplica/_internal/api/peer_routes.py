"""The replication protocol's routes on the certificate listener (replica side)."""

from __future__ import annotations

import json

from aiohttp import web

from vmreplica._internal.api.replication import PeerHandler
from vmreplica._internal.engine.failover import FailoverService
from vmreplica._internal.engine.replica import ReplicaEngine
from vmreplica._internal.engine.server import Authorization
from vmreplica.errors import InvalidArgument

CHUNK = 4 * 1024 * 1024


def peer_routes(replica: ReplicaEngine, failover: FailoverService) -> dict[str, PeerHandler]:
    async def body(request: web.Request) -> dict[str, object]:
        data = json.loads(await request.read() or b"{}")
        if not isinstance(data, dict):
            raise InvalidArgument("request body must be a JSON object")
        return data

    async def enable(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return web.json_response(
            {"result": await replica.enable(authz, names, await body(request))}
        )

    async def status(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return web.json_response(
            {"result": await replica.status(authz, names, await body(request))}
        )

    async def delta(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = request.query.get("vm_id")
        if not vm_id:
            raise InvalidArgument("missing vm_id")
        result = await replica.receive(authz, names, vm_id, request.content.iter_chunked(CHUNK))
        return web.json_response({"result": result})

    async def vm_state(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return web.json_response(
            {"result": await failover.vm_state(authz, names, await body(request))}
        )

    async def reverse(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return web.json_response(
            {"result": await failover.become_replica(authz, names, await body(request))}
        )

    return {
        "/replication/v1/vm-state": vm_state,
        "/replication/v1/reverse": reverse,
        "/replication/v1/enable": enable,
        "/replication/v1/status": status,
        "/replication/v1/delta": delta,
    }
