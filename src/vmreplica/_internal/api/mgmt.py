"""The management API: what the SDK (and so the CLI) calls, on the unix socket and on HTTPS.

It is an RPC surface, ``POST /v1/<method>`` with a JSON object of arguments, answered with
``{"result": …}`` or an error (see :mod:`vmreplica.errors`). Handlers only decode arguments into
typed values and call the engine; all rules live in the engine.

Over HTTPS the caller must present a client certificate from the host's CA whose DNS name is one
of the administrators listed in host.toml; over the unix socket, file permissions (root only)
are the guard.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from vmreplica._internal import faults
from vmreplica._internal.api import dashboard
from vmreplica._internal.api.body import MAX_JSON_BODY, read_object
from vmreplica._internal.api.errors import Handler, error_middleware
from vmreplica._internal.certs import peer_dns_names
from vmreplica._internal.models import Model
from vmreplica.errors import AccessDenied, InvalidArgument, NotFound

Method = Callable[[dict[str, Any]], Awaitable[Any]]

ADMINS_KEY = web.AppKey("admins", frozenset[str])
METHODS_KEY = web.AppKey("methods", dict[str, Method])


def to_jsonable(value: Any) -> Any:
    if isinstance(value, Model):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


async def _call(request: web.Request) -> web.Response:
    name = request.match_info["method"]
    faults.hit("mgmt.call")
    method = request.app[METHODS_KEY].get(name)
    if method is None:
        raise NotFound(f"unknown management method {name!r} (is the agent older than this CLI?)")
    result = await method(await read_object(request))
    return web.json_response({"result": to_jsonable(result)})


@web.middleware
async def _admin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Over TLS, only the administrator certificates named in host.toml get through, and a
    call must be JSON (api/dashboard.py says why)."""
    admins = request.app[ADMINS_KEY]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if isinstance(ssl_object, ssl.SSLObject):
        names = peer_dns_names(ssl_object.getpeercert() or {})
        if not admins.intersection(n.lower() for n in names):
            raise AccessDenied(
                f"access denied: certificate {', '.join(names) or '(no name)'} is not an administrator of this host"
            )
        if request.method == "POST" and request.content_type != "application/json":
            raise InvalidArgument(
                "management calls take a JSON body (Content-Type: application/json)"
            )
    return await handler(request)


def make_app(
    methods: dict[str, Method], admins: frozenset[str], metrics: Handler | None = None
) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, _admin_only], client_max_size=MAX_JSON_BODY
    )
    app[ADMINS_KEY] = frozenset(a.lower() for a in admins)
    app[METHODS_KEY] = methods
    app.router.add_post("/v1/{method}", _call)
    if metrics is not None:
        app.router.add_get("/metrics", metrics)  # api/metrics.py
    if admins:  # the HTTPS listener: a browser can reach it
        dashboard.add_routes(app)
    return app
