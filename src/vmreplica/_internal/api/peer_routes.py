"""The replication protocol's routes on the certificate listener.

Every route but ``delta`` takes a JSON object and answers ``{"result": …}``; ``delta`` streams the
delta in the body, with the VM id in the query string. ``initial-open`` and ``initial-close``
bracket an initial copy, whose data goes over NBD with TLS (hypervisor/nbd_copy.py) instead.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from vmreplica._internal.api.replication import PeerHandler, local_address, peer_identity
from vmreplica._internal.engine.failover import FailoverService
from vmreplica._internal.engine.replica import ReplicaEngine
from vmreplica._internal.engine.server import Authorization
from vmreplica.errors import InvalidArgument

CHUNK = 4 * 1024 * 1024

EngineCall = Callable[[Authorization, list[str], dict[str, Any]], Awaitable[dict[str, Any]]]


async def _json_body(request: web.Request) -> dict[str, Any]:
    data = json.loads(await request.read() or b"{}")
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def _json_route(call: EngineCall) -> PeerHandler:
    async def handler(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return web.json_response({"result": await call(authz, names, await _json_body(request))})

    return handler


def peer_routes(replica: ReplicaEngine, failover: FailoverService) -> dict[str, PeerHandler]:
    async def delta(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = request.query.get("vm_id")
        if not vm_id:
            raise InvalidArgument("missing vm_id")
        result = await replica.receive(authz, names, vm_id, request.content.iter_chunked(CHUNK))
        return web.json_response({"result": result})

    async def initial_open(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        result = await replica.open_initial(
            authz, names, await _json_body(request), listen_host=local_address(request),
            peer_identity=peer_identity(request),
        )  # fmt: skip
        return web.json_response({"result": result})

    return {
        "/replication/v1/initial-open": initial_open,
        "/replication/v1/initial-close": _json_route(replica.close_initial),
        "/replication/v1/vm-state": _json_route(failover.vm_state),
        "/replication/v1/reverse": _json_route(failover.become_replica),
        "/replication/v1/enable": _json_route(replica.enable),
        "/replication/v1/status": _json_route(replica.status),
        "/replication/v1/delta": delta,
    }
