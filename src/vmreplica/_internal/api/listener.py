"""The certificate listener: the data plane a primary talks to (HTTPS with mutual TLS).

The peer's identity is the DNS names of its client certificate, checked against the
authorization entries *before* a request body is read, so an unknown peer stores nothing.
:class:`CertificateListener` opens, re-opens (port or certificate changed) and closes the
listener as the server settings change.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from vmreplica._internal.api.body import MAX_JSON_BODY, read_object
from vmreplica._internal.api.errors import Handler, error_middleware
from vmreplica._internal.certs import (
    load_crl,
    peer_dns_names,
    server_ssl_context,
    subject_identity,
)
from vmreplica._internal.engine.authorization import Authorization, AuthorizationService
from vmreplica._internal.engine.server_settings import ListenerFiles, ServerService
from vmreplica._internal.models import ServerSettings
from vmreplica._internal.transport import answers, protocol
from vmreplica._internal.transport.gss import ServerExchange
from vmreplica.errors import AccessDenied, ConnectionFailed

log = logging.getLogger("vmreplica.listener")

PEER_KEY = web.AppKey("peer", str)
AUTHZ_KEY = "vmreplica.authorization"
SERVER_KEY = web.AppKey("server", ServerService)

# Routes the replication engine adds: (path, handler taking the request and the authorization).
PeerHandler = Callable[[web.Request, Authorization, list[str]], Awaitable[web.StreamResponse]]


def peer_names(request: web.Request) -> list[str]:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        raise AccessDenied("not authorized: no client certificate was presented")
    return peer_dns_names(ssl_object.getpeercert() or {})


def peer_identity(request: web.Request) -> str:
    """The client certificate's subject, as QEMU's authz-simple compares it."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = (
        ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    )
    if not der:
        raise AccessDenied("not authorized: no client certificate was presented")
    return subject_identity(der)


def local_address(request: web.Request) -> str:
    """The address this request arrived on: the one the peer can reach."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        raise ConnectionFailed("cannot tell which address the request arrived on")
    return str(sockname[0])


# The Kerberos listener puts the names of the request's authenticated principal here, and the
# exchange that authenticated it.
KERBEROS_NAMES_KEY = "vmreplica.kerberos-names"
KERBEROS_EXCHANGE_KEY = "vmreplica.kerberos-exchange"


def kerberos_secret(request: web.Request, label: str) -> bytes | None:
    """A key only this request's sender also has (Kerberos listener), else None."""
    exchange: ServerExchange | None = request.get(KERBEROS_EXCHANGE_KEY)
    return exchange.secret(label) if exchange is not None else None


def authenticated_names(request: web.Request) -> list[str]:
    """The sender's names, by whichever listener the request came in on."""
    names: list[str] | None = request.get(KERBEROS_NAMES_KEY)
    return names if names is not None else peer_names(request)


def wrap(auth: AuthorizationService, handler: PeerHandler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        names = authenticated_names(request)
        authorization = auth.authorize(names)
        if KERBEROS_NAMES_KEY in request:
            authorization = dataclasses.replace(authorization, authentication_type="kerberos")
        return await handler(request, authorization, names)

    return wrapped


async def hello(request: web.Request, authz: Authorization, names: list[str]) -> web.StreamResponse:
    await read_object(request)  # it takes no field, but garbage is refused like anywhere else
    settings = request.app[SERVER_KEY].get()
    answer = answers.HelloAnswer(
        replica_server=settings.computer_name,
        peer=names[0] if names else None,
        authorization_entry=authz.entry,
        trust_group=authz.trust_group,
    )
    return web.json_response({"result": answer.to_json()})


async def open_site(
    app: web.Application, port: int, context: ssl.SSLContext | None, what: str
) -> web.AppRunner:
    """A replication listener on every address, or a one-line refusal (a port in use)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=None, port=port, ssl_context=context, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConnectionFailed(
            f"cannot open the {what} listener on port {port}: {e.strerror or e}"
        ) from e
    return runner


class CertificateListener:
    """Keeps the listener's socket in line with the settings (see ServerService.set)."""

    def __init__(
        self,
        server: ServerService,
        auth: AuthorizationService,
        extra_routes: dict[str, PeerHandler] | None = None,
    ) -> None:
        self._server = server
        self._auth = auth
        self.routes: dict[str, PeerHandler] = {protocol.HELLO: hello}
        self.routes.update(extra_routes or {})
        self._runner: web.AppRunner | None = None
        self._key: tuple[int, ListenerFiles] | None = None
        self._context: ssl.SSLContext | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JSON_BODY)
        app[SERVER_KEY] = self._server
        for path, handler in self.routes.items():
            app.router.add_post(path, wrap(self._auth, handler))
        return app

    @property
    def port(self) -> int | None:
        return self._key[0] if self._key else None

    async def apply(self, settings: ServerSettings, files: ListenerFiles) -> None:
        """Open, move or close the listener; on failure the listener stays as it was.

        The new listener is opened before the old one closes, so a refused change (a port in
        use, an unreadable key) never leaves the host without its listener. Only a change of
        certificate on the same port must free the port first; should the new one then fail to
        open, the old one is opened again.
        """
        wanted = settings.replication_enabled and settings.allowed_authentication_type in (
            "certificate",
            "both",
        )
        key = (settings.certificate_authentication_port, files)
        if wanted and self._key == key:
            return
        if not wanted:
            await self.close()
            return
        context = server_ssl_context(files.ca, files.cert, files.key, files.crl)  # bad: no move
        old_runner, old_key = self._runner, self._key
        if old_key is not None and old_key[0] == key[0]:
            await self.close()
            try:
                self._runner = await self._open(key[0], context)
            except ConnectionFailed:
                old_files = old_key[1]
                old_context = server_ssl_context(
                    old_files.ca, old_files.cert, old_files.key, old_files.crl
                )
                self._runner = await self._open(old_key[0], old_context)
                self._key = old_key
                raise
        else:
            self._runner = await self._open(key[0], context)
            if old_runner is not None:
                await old_runner.cleanup()
                log.info("certificate listener on port %s closed", old_key[0] if old_key else None)
        self._key = key
        log.info("certificate listener open on port %d", key[0])

    def reload_crl(self, crl: Path) -> None:
        """New revocations apply to the next handshake; the open socket stays open."""
        if self._context is not None:
            load_crl(self._context, crl)

    async def _open(self, port: int, context: ssl.SSLContext) -> web.AppRunner:
        self._context = context
        return await open_site(self._app(), port, context, "certificate")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            log.info("certificate listener on port %s closed", self.port)
        self._runner, self._key = None, None
