"""The replication protocol's routes on the certificate listener.

Every route but ``delta`` and ``boot-file`` takes a JSON object, parsed into its typed request
(:mod:`vmreplica._internal.transport.protocol`) before the engine sees it, and answers
``{"result": …}``; those two stream their body, with the VM id in the query string.
``initial-open`` and ``initial-close`` bracket an initial copy, whose data goes over NBD with TLS
(hypervisor/nbd_copy.py) instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from vmreplica._internal.api.body import read_object
from vmreplica._internal.api.listener import PeerHandler, local_address, peer_identity
from vmreplica._internal.engine.failover import FailoverService
from vmreplica._internal.engine.replica import ReplicaEngine
from vmreplica._internal.engine.server import Authorization
from vmreplica._internal.transport import protocol as p

CHUNK = 4 * 1024 * 1024


R = TypeVar("R")
EngineCall = Callable[[Authorization, list[str], R], Awaitable[dict[str, Any]]]


def _json_route(parse: Callable[[dict[str, Any]], R], call: EngineCall[R]) -> PeerHandler:
    async def handler(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        typed = parse(await read_object(request))
        return web.json_response({"result": await call(authz, names, typed)})

    return handler


def peer_routes(replica: ReplicaEngine, failover: FailoverService) -> dict[str, PeerHandler]:
    async def delta(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = p.parse_vm_id(request.query.get("vm_id"), "query parameter vm_id")
        result = await replica.receive(authz, names, vm_id, request.content.iter_chunked(CHUNK))
        return web.json_response({"result": result})

    async def boot_file(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = p.parse_vm_id(request.query.get("vm_id"), "query parameter vm_id")
        kind = p.parse_boot_kind(request.query.get("kind"))
        result = await replica.receive_boot_file(
            authz, names, vm_id, kind, request.content.iter_chunked(CHUNK)
        )
        return web.json_response({"result": result})

    async def initial_open(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        typed = p.InitialOpenRequest.from_json(await read_object(request))
        result = await replica.open_initial(
            authz, names, typed, listen_host=local_address(request),
            peer_identity=peer_identity(request),
        )  # fmt: skip
        return web.json_response({"result": result})

    return {
        p.INITIAL_OPEN: initial_open,
        p.INITIAL_CLOSE: _json_route(p.InitialCloseRequest.from_json, replica.close_initial),
        p.VM_STATE: _json_route(p.VmRequest.from_json, failover.vm_state),
        p.REVERSE: _json_route(p.ReverseRequest.from_json, failover.become_replica),
        p.ENABLE: _json_route(p.EnableRequest.from_json, replica.enable),
        p.STATUS: _json_route(p.StatusRequest.from_json, replica.status),
        p.DELTA: delta,
        p.BOOT_FILE: boot_file,
    }
