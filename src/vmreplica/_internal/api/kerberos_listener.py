"""The Kerberos listener: the replication routes over plain HTTP, each call authenticated by its
own SPNEGO exchange with mutual authentication and bound to it by GSS MICs (transport/signed.py).

It opens and closes with the server settings (``--auth kerberos|both``, ``--kerberos-port``),
like the certificate listener; a keytab that cannot serve refuses the settings change.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from vmreplica._internal.api.body import BODY_KEY, MAX_JSON_BODY, raw_chunks, read_object
from vmreplica._internal.api.errors import Handler, error_middleware, error_response
from vmreplica._internal.api.listener import (
    KERBEROS_EXCHANGE_KEY,
    KERBEROS_NAMES_KEY,
    SERVER_KEY,
    PeerHandler,
    hello,
    open_site,
    wrap,
)
from vmreplica._internal.config import KerberosKeys
from vmreplica._internal.engine.authorization import AuthorizationService
from vmreplica._internal.engine.server_settings import ListenerControl, ListenerFiles, ServerService
from vmreplica._internal.models import ServerSettings
from vmreplica._internal.transport import protocol
from vmreplica._internal.transport.gss import Acceptor, ServerExchange
from vmreplica._internal.transport.signed import (
    CONTEXT_HEADER,
    MIC_HEADER,
    PROTECTION_HEADER,
    SEALED,
    answer_message,
    b64,
    request_message,
    seal_answer,
    unb64,
    unsealed_body,
    verified_body,
)
from vmreplica.errors import AccessDenied, VmrError

log = logging.getLogger("vmreplica.listener")

CONTEXT_TTL = 120.0  # seconds between a negotiate and the call that uses its context


@dataclass
class _Negotiated:
    exchange: ServerExchange
    expires: float


class KerberosListener:
    def __init__(
        self, server: ServerService, auth: AuthorizationService, routes: dict[str, PeerHandler],
        keys: KerberosKeys, fqdn: str,
    ) -> None:  # fmt: skip
        self._server = server
        self._auth = auth
        self.routes = {protocol.HELLO: hello, **routes}
        self._acceptor = Acceptor(keys, fqdn)
        self._contexts: dict[str, _Negotiated] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        return self._port

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._bind, error_middleware], client_max_size=MAX_JSON_BODY
        )
        app[SERVER_KEY] = self._server
        app.router.add_post(protocol.NEGOTIATE, self._negotiate)
        for path, handler in self.routes.items():
            app.router.add_post(path, wrap(self._auth, handler))
        return app

    async def _negotiate(self, request: web.Request) -> web.StreamResponse:
        await read_object(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "negotiate" or not token:
            raise AccessDenied("Kerberos: the request carries no Authorization: Negotiate token")
        exchange = self._acceptor.accept(unb64(token, "Negotiate token"))
        request[KERBEROS_EXCHANGE_KEY] = exchange
        self._auth.authorize([exchange.principal.host])  # an unauthorized host learns no more
        now = time.monotonic()
        self._contexts = {k: v for k, v in self._contexts.items() if v.expires > now}
        context_id = secrets.token_urlsafe(24)
        self._contexts[context_id] = _Negotiated(exchange, now + CONTEXT_TTL)
        response = web.json_response({"result": {"context": context_id}})
        response.headers["WWW-Authenticate"] = f"Negotiate {b64(exchange.reply)}"
        return response

    @web.middleware
    async def _bind(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outside the error middleware, so refusals are signed like answers once a context is
        known; before that (negotiate refused, no context) they go unsigned: there is no key."""
        if request.path != protocol.NEGOTIATE:
            negotiated = self._contexts.pop(request.headers.get(CONTEXT_HEADER, ""), None)
            if negotiated is None or negotiated.expires < time.monotonic():
                return error_response(
                    AccessDenied(
                        "Kerberos: this call has no valid negotiated context (each call "
                        "negotiates first, and a context serves one call only)"
                    )
                )
            exchange = negotiated.exchange
            request[KERBEROS_EXCHANGE_KEY] = exchange
            request[KERBEROS_NAMES_KEY] = [exchange.principal.host]
            request[BODY_KEY] = _body_reader(request, exchange)
        response = await handler(request)
        exchange_or_none: ServerExchange | None = request.get(KERBEROS_EXCHANGE_KEY)
        if exchange_or_none is None or not isinstance(response, web.Response):
            return response
        body = response.body if isinstance(response.body, bytes) else b""
        if _sealed(request):
            sealed = web.Response(
                body=seal_answer(response.status, body, exchange_or_none.wrap),
                status=response.status, content_type="application/octet-stream",
            )  # fmt: skip
            sealed.headers[PROTECTION_HEADER] = SEALED
            return sealed
        mic = exchange_or_none.mic(answer_message(response.status, body))
        response.headers[MIC_HEADER] = b64(mic)
        return response

    async def apply(self, settings: ServerSettings, files: ListenerFiles) -> None:
        """Open, move or close the listener; on failure it stays as it was."""
        del files  # certificates play no part here
        wanted = settings.replication_enabled and settings.allowed_authentication_type in (
            "kerberos",
            "both",
        )
        port = settings.kerberos_authentication_port
        if not wanted:
            await self.close()
            return
        self._acceptor.check()  # a missing or unreadable keytab refuses the change
        if self._port == port:
            return
        runner = await open_site(self._app(), port, None, "Kerberos")
        await self.close()
        self._runner, self._port = runner, port
        log.info("Kerberos listener open on port %d", port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            log.info("Kerberos listener on port %s closed", self._port)
        self._runner, self._port = None, None
        self._contexts.clear()


def _sealed(request: web.Request) -> bool:
    return request.path != protocol.NEGOTIATE and request.headers.get(PROTECTION_HEADER) == SEALED


def _body_reader(
    request: web.Request, exchange: ServerExchange
) -> Callable[[int], AsyncIterator[bytes]]:
    def check(digest: bytes, mic: bytes) -> None:
        exchange.verify(request_message(request.method, request.path_qs, digest), mic)

    def reader(size: int) -> AsyncIterator[bytes]:
        chunks = raw_chunks(request, size)
        if _sealed(request):
            return unsealed_body(chunks, exchange.unwrap, check)
        return verified_body(chunks, check)

    return reader


class Listeners:
    """Both listeners as one for the server settings: a change applies to both or to neither."""

    def __init__(self, *listeners: ListenerControl) -> None:
        self._listeners = listeners
        self._last: tuple[ServerSettings, ListenerFiles] | None = None

    async def apply(self, settings: ServerSettings, files: ListenerFiles) -> None:
        done = []
        try:
            for listener in self._listeners:
                await listener.apply(settings, files)
                done.append(listener)
        except VmrError:
            if self._last is not None:
                for listener in done:
                    try:
                        await listener.apply(*self._last)
                    except VmrError as e:
                        log.warning("cannot restore a listener: %s", e.message)
            raise
        self._last = (settings, files)
