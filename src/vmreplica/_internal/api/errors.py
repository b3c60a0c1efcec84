"""The one place where vmreplica errors become HTTP answers on the agent's listeners."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from vmreplica.errors import InvalidArgument, VmrError

log = logging.getLogger("vmreplica.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: VmrError) -> web.Response:
    return web.json_response(err.to_json(), status=err.http_status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VmrError as err:
        log.info("%s %s refused: %s", request.method, request.path, err.message)
        return error_response(err)
    except web.HTTPException:
        raise
    except json.JSONDecodeError:
        return error_response(InvalidArgument("request body is not valid JSON"))
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return error_response(VmrError("internal error in the agent: see the agent's log"))
