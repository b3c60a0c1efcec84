"""The one place where vmreplica errors become HTTP answers on the agent's listeners."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from vmreplica.errors import InvalidArgument, NotFound, VmrError

log = logging.getLogger("vmreplica.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: VmrError) -> web.Response:
    return web.json_response(err.to_json(), status=err.http_status)


def _from_http(exc: web.HTTPException) -> VmrError:
    """aiohttp's own refusals (no such route, wrong method, body too large) in our terms."""
    if exc.status == 404:
        return NotFound("no such route on this agent (is it older than the caller?)")
    return InvalidArgument(f"request refused: {exc.reason}")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VmrError as err:
        log.info("%s %s refused: %s", request.method, request.path, err.message)
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(exc))
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return error_response(VmrError("internal error in the agent: see the agent's log"))
