"""The SDK's plumbing (vmreplica.client): one management API request per call, over the local
unix socket or HTTPS with the administrator's certificate, and a way to wait for one from
synchronous code that works whether or not an event loop runs in the calling thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import ssl
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from vmreplica._internal import local_http
from vmreplica._internal.config import DEFAULT_SOCKET, RemoteHost, tls_server_name
from vmreplica._internal.tls_context import client_ssl_context
from vmreplica._internal.tls_refusals import own_certificate_refused, peer_certificate_refused
from vmreplica.errors import AccessDenied, ConnectionFailed, error_from_json

T = TypeVar("T")


def _default_socket() -> Path:
    return Path(os.environ.get("VMREPLICA_SOCKET", DEFAULT_SOCKET))


class Transport:
    """One management API request per call, on whatever event loop awaits it."""

    def __init__(self, socket: Path | None, remote: RemoteHost | None, timeout: float | None):
        self.socket = socket or _default_socket()
        self.remote = remote
        self.timeout = timeout
        # Built once: loading the CA and key is file I/O, and a context is safe to share
        # between the threads and loops that the sync client may run requests on.
        self.ssl = (
            client_ssl_context(remote.ca, remote.cert, remote.key, remote.crl) if remote else None
        )
        if self.ssl is not None:
            # Under TLS 1.2 an agent that refuses the administrator's certificate says why in
            # the handshake (expired, revoked); under 1.3 the connection just drops later.
            self.ssl.maximum_version = ssl.TLSVersion.TLSv1_2
        self.server_name = tls_server_name(remote) if remote else None

    @property
    def target(self) -> str:
        return self.remote.name if self.remote else f"the local agent ({self.socket})"

    async def request(self, method: str, args: dict[str, Any] | None) -> Any:
        body = json.dumps({k: v for k, v in (args or {}).items() if v is not None}).encode()
        if self.remote is None:
            status, raw = await asyncio.to_thread(
                local_http.post, self.socket, method, body, self.timeout
            )
            return decode_result(status, raw)
        return await self._remote_request(self.remote, method, body)

    async def _remote_request(self, remote: RemoteHost, method: str, body: bytes) -> Any:
        # Imported here: only HTTPS needs it, and the local CLI starts faster without it.
        import aiohttp

        headers = {"Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    f"{remote.url}/v1/{method}",
                    data=body,
                    headers=headers,
                    ssl=self.ssl or True,
                    server_hostname=self.server_name,
                ) as resp,
            ):
                return decode_result(resp.status, await resp.read())
        except aiohttp.ClientConnectorCertificateError as e:
            dated = peer_certificate_refused(
                getattr(e.certificate_error, "verify_message", "") or "", self.target
            )
            raise ConnectionFailed(
                dated or f"{self.target}: its certificate is not trusted ({e.certificate_error})"
            ) from e
        except aiohttp.ClientConnectorError as e:
            err = e.os_error
            if isinstance(err, ssl.SSLError | ConnectionResetError):
                refused = own_certificate_refused(
                    str(err), remote.cert, self.target, refused=True, crl=remote.crl,
                    ca=remote.ca,
                )  # fmt: skip
                if refused is not None:
                    raise AccessDenied(refused) from e
            raise ConnectionFailed(
                f"cannot reach {self.target} at {remote.url}: "
                f"{err.strerror or str(err) or type(err).__name__}"
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            if isinstance(e, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError):
                refused = own_certificate_refused(
                    f"{e} {e.__cause__ or ''}",
                    remote.cert,
                    self.target,
                    refused=True,
                    crl=remote.crl,
                    ca=remote.ca,
                )
                raise AccessDenied(
                    refused
                    or f"{self.target} refused the connection: is the administrator certificate "
                    f"{remote.cert} issued by its CA?"
                ) from e
            raise ConnectionFailed(
                f"{self.target}: request failed ({e or type(e).__name__})"
            ) from e


def decode_result(status: int, raw: bytes) -> Any:
    try:
        decoded = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        decoded = None
    if status >= 400 or not isinstance(decoded, dict) or "result" not in decoded:
        raise error_from_json(decoded, status)
    return decoded["result"]


def wait(request: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one request to the end from synchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(request())
    # Sync code called from async code: asyncio.run refuses to nest, and this thread cannot
    # await on the running loop without blocking that very loop, so the request gets a loop of
    # its own in a thread of its own. A thread per call keeps nothing alive between calls.
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def work() -> None:
        try:
            done.set_result(asyncio.run(request()))
        except BaseException as e:  # every outcome, errors included, belongs to the caller
            done.set_exception(e)

    threading.Thread(target=work, name="vmreplica-client", daemon=True).start()
    return done.result()
