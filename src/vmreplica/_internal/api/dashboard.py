"""The web dashboard: three static files the management listener serves to an administrator's
browser (behind the same mutual TLS as the API). The page does everything through the
management API (``POST /v1/<method>``), so it has no code path of its own in the agent.

Served with a Content-Security-Policy that allows only this origin and no framing, and the API
takes only ``application/json`` bodies over TLS, which a page of another origin cannot send
without a CORS preflight that the agent never answers: another site open in the administrator's
browser cannot drive the agent with the browser's client certificate.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_FILES = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def add_routes(app: web.Application) -> None:
    static = resources.files("vmreplica._internal.api") / "static"
    for path, (name, kind) in _FILES.items():
        body = (static / name).read_bytes()

        async def serve(request: web.Request, body: bytes = body, kind: str = kind) -> web.Response:
            return web.Response(body=body, content_type=kind, charset="utf-8", headers=_HEADERS)

        app.router.add_get(path, serve)
