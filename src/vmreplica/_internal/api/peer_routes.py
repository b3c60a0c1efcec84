"""The replication protocol's routes on the certificate listener.

Every route but ``delta`` and ``boot-file`` takes a JSON object, parsed into its typed request
(:mod:`vmreplica._internal.transport.protocol`) before the engine sees it, and answers
``{"result": …}``; those two stream their body, with the VM id in the query string.
``initial-open`` and ``initial-close`` bracket an initial copy, whose data goes over NBD with TLS
(hypervisor/nbd_copy.py) instead: with the certificates, or on the Kerberos listener with a
one-time pre-shared key both sides derive from the session key of the initial-open exchange.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from vmreplica._internal.api.body import body_chunks, read_object
from vmreplica._internal.api.listener import (
    PeerHandler,
    kerberos_secret,
    local_address,
    peer_identity,
)
from vmreplica._internal.engine.authorization import Authorization
from vmreplica._internal.engine.replica.initial import PeerTls
from vmreplica._internal.engine.services import Services
from vmreplica._internal.ports.hypervisor import NbdPsk
from vmreplica._internal.transport import delta_resume
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.fields import parse_vm_id

CHUNK = 4 * 1024 * 1024


R = TypeVar("R")


class Answer(Protocol):
    def to_json(self) -> dict[str, Any]: ...


EngineCall = Callable[[Authorization, list[str], R], Awaitable[Answer]]


def _answer(result: Answer | dict[str, Any]) -> web.Response:
    return web.json_response({"result": result if isinstance(result, dict) else result.to_json()})


def _json_route(parse: Callable[[dict[str, Any]], R], call: EngineCall[R]) -> PeerHandler:
    async def handler(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        return _answer(await call(authz, names, parse(await read_object(request))))

    return handler


def peer_routes(engine: Services) -> dict[str, PeerHandler]:
    replica, old_primary = engine.replica, engine.failover.old_primary

    async def delta(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = parse_vm_id(request.query.get("vm_id"), "query parameter vm_id")
        resume = delta_resume.parse_query(request.query.get("resume"))
        chunks = body_chunks(request, CHUNK)
        return _answer(await replica.receiver.receive(authz, names, vm_id, chunks, resume))

    async def boot_file(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        vm_id = parse_vm_id(request.query.get("vm_id"), "query parameter vm_id")
        kind = p.parse_boot_kind(request.query.get("kind"))
        chunks = body_chunks(request, CHUNK)
        return _answer(await replica.lifecycle.receive_boot_file(authz, names, vm_id, kind, chunks))

    async def initial_open(
        request: web.Request, authz: Authorization, names: list[str]
    ) -> web.StreamResponse:
        typed = p.InitialOpenRequest.from_json(await read_object(request))
        secret = kerberos_secret(request, p.psk_label(typed.vm_id))
        answer = await replica.initial.open(
            authz, names, typed, listen_host=local_address(request),
            credentials=(
                NbdPsk(p.psk_username(typed.vm_id), secret)
                if secret is not None
                else PeerTls(peer_identity(request))
            ),
        )  # fmt: skip
        return _answer(answer)

    return {
        p.INITIAL_OPEN: initial_open,
        p.INITIAL_CLOSE: _json_route(p.InitialCloseRequest.from_json, replica.initial.close),
        p.VM_STATE: _json_route(p.VmRequest.from_json, old_primary.vm_state),
        p.REVERSE: _json_route(p.ReverseRequest.from_json, old_primary.become_replica),
        p.ENABLE: _json_route(p.EnableRequest.from_json, replica.lifecycle.enable),
        p.STATUS: _json_route(p.StatusRequest.from_json, replica.lifecycle.status),
        p.RESYNC_START: _json_route(p.ResyncStartRequest.from_json, replica.resync.start),
        p.RESYNC_HASHES: _json_route(p.HashesRequest.from_json, replica.resync.hashes),
        p.RESYNC_FINISH: _json_route(p.VmRequest.from_json, replica.resync.finish),
        p.RESYNC_CANCEL: _json_route(p.VmRequest.from_json, replica.resync.cancel),
        p.INITIAL_OFFLINE: _json_route(p.InitialOfflineRequest.from_json, replica.media.announce),
        p.DELTA: delta,
        p.BOOT_FILE: boot_file,
    }
