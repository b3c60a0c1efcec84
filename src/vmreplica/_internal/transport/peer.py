"""The replication client: how a primary talks to a replica server's certificate listener.

It presents the host certificate, verifies the replica's certificate against the host CA and
the replica's FQDN (not the address dialled, which ``[resolve]`` may override), and turns every
transport failure into a :class:`ConnectionFailed` whose message names the stage that failed:
unreachable, untrusted certificate, name mismatch. Refusals the replica sends back arrive as the
replica's own error class and message.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from vmreplica._internal.certs import client_ssl_context
from vmreplica._internal.config import PeerCredentials, TlsFiles
from vmreplica._internal.tls_refusals import (
    OWN_REASONS,
    own_certificate_refused,
    peer_certificate_refused,
)
from vmreplica._internal.transport import answers, redirect
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica._internal.transport.redirect import redirect_in
from vmreplica.errors import ConnectionFailed, VmrError, error_from_json

UNREACHABLE = "unreachable"
UNTRUSTED = "untrusted certificate"
NAME_MISMATCH = "name mismatch"


class PeerConnectionFailed(ConnectionFailed):
    """A failure before the replica could answer; ``stage`` is one of the constants above."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


CERTIFICATE = "certificate"
KERBEROS = "kerberos"


@dataclass(frozen=True)
class PeerAddress:
    fqdn: str
    address: str
    port: int
    auth: str = CERTIFICATE  # or KERBEROS: the replica's plain-HTTP Kerberos listener
    encrypt: bool = False  # Kerberos: bodies GSS-wrapped with confidentiality

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "http" if self.auth == KERBEROS else "https"
        return f"{scheme}://{host}:{self.port}"


STALL_TIMEOUT = 60
"""Seconds a connection may hold data the peer has not acknowledged before it counts as lost."""


def _socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A TCP socket that notices a dead link within :data:`STALL_TIMEOUT`.

    aiohttp's read timeout does not cover a request body being written: when a link dies
    mid-delta (no FIN or RST gets through), Linux retransmits the unacknowledged data for about
    15 minutes (tcp_retries2) before the write fails. TCP_USER_TIMEOUT bounds that; keepalive
    probes notice a dead link while waiting for an answer too.
    """
    family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, STALL_TIMEOUT * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    return sock


class PeerClient:
    def __init__(self, peer: PeerAddress, tls: TlsFiles | None, timeout: float = 30.0) -> None:
        self.peer = peer
        self._ssl: ssl.SSLContext | None = None
        self._cert = tls.cert if tls is not None else None
        self._crl = tls.crl if tls is not None else None
        self._ca = tls.ca if tls is not None else None
        if tls is not None:
            self._ssl = client_ssl_context(tls.ca, tls.cert, tls.key, tls.crl)
            # Under TLS 1.3 a replica that rejects our certificate only closes the connection
            # after the handshake, indistinguishable from any other drop; under TLS 1.2 the
            # rejection is an alert during the handshake, so the operator is told exactly which
            # side refused.
            self._ssl.maximum_version = ssl.TLSVersion.TLSv1_2
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, connector=aiohttp.TCPConnector(socket_factory=_socket)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _describe(self) -> str:
        return f"{self.peer.fqdn}:{self.peer.port}"

    async def call(
        self,
        path: str,
        payload: dict[str, Any] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body = data if data is not None else json.dumps(payload or {}).encode()
        status, raw, _ = await self.post(path, body, headers)
        return decode_answer(status, raw)

    def secret(self, label: str) -> bytes | None:
        """A key only the replica also has, from the last call (Kerberos only)."""
        del label
        return None

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One request; every transport failure as a :class:`PeerConnectionFailed`."""
        assert self._session is not None, "use PeerClient as an async context manager"
        url = self.peer.base_url + path
        try:
            async with self._session.post(
                url, data=body, headers=headers, ssl=self._ssl or False,
                server_hostname=self.peer.fqdn if self._ssl else None,
            ) as resp:  # fmt: skip
                return resp.status, await resp.read(), resp.headers
        except aiohttp.ClientConnectorCertificateError as e:
            raise self._certificate_failure(e.certificate_error) from e
        except aiohttp.ClientSSLError as e:
            raise self._certificate_failure(e) from e
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, ssl.SSLError):
                raise self._certificate_failure(e.os_error) from e
            if isinstance(e.os_error, ConnectionResetError):
                # TCP connected, then the replica dropped us inside the TLS handshake: the only
                # thing it checks there is our certificate.
                failure = self._certificate_failure(e, refused=True)
                if failure.message.split(":")[0] in OWN_REASONS:
                    raise failure from e
                raise PeerConnectionFailed(
                    UNTRUSTED,
                    f"untrusted certificate: {self._describe()} refused this host's certificate "
                    "during the TLS handshake (is it issued by a CA the replica trusts? is it "
                    "revoked? name the CA's CRL in host.toml [tls] crl to tell)",
                ) from e
            raise PeerConnectionFailed(
                UNREACHABLE,
                f"unreachable: cannot connect to {self._describe()} ({e.os_error.strerror or e.os_error}); "
                "is replication enabled there, and is the port right?",
            ) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if isinstance(e.__cause__, ssl.SSLError) or "alert" in str(e).lower():
                failure = self._certificate_failure(e, refused=_looks_like_tls_alert(e))
                if failure.message.split(":")[0] in OWN_REASONS:
                    raise failure from e
            if _looks_like_tls_alert(e):
                raise PeerConnectionFailed(
                    UNTRUSTED,
                    f"untrusted certificate: {self._describe()} refused this host's certificate "
                    "(is it issued by a CA the replica trusts?)",
                ) from e
            raise PeerConnectionFailed(
                UNREACHABLE, f"connection to {self._describe()} lost: {e}"
            ) from e
        except TimeoutError as e:
            raise PeerConnectionFailed(
                UNREACHABLE, f"unreachable: {self._describe()} did not answer in time"
            ) from e

    def _certificate_failure(self, err: BaseException, refused: bool = False) -> VmrError:
        text = f"{err} {err.__cause__ or ''}"
        dated = (
            own_certificate_refused(
                text, self._cert, self._describe(), refused, self._crl, self._ca
            )
            if self._cert
            else None
        ) or peer_certificate_refused(getattr(err, "verify_message", None) or "", self._describe())
        if dated is not None:
            return PeerConnectionFailed(UNTRUSTED, dated)
        if (
            isinstance(err, ssl.SSLCertVerificationError) and err.verify_code == 62
        ) or "mismatch" in text:
            return PeerConnectionFailed(
                NAME_MISMATCH,
                f"name mismatch: the certificate of {self._describe()} is not issued to {self.peer.fqdn}",
            )
        if (
            "unknown ca" in text.lower()
            or "certificate required" in text.lower()
            or "bad certificate" in text.lower()
        ):
            return PeerConnectionFailed(
                UNTRUSTED,
                f"untrusted certificate: {self._describe()} refused this host's certificate "
                "(is it issued by a CA the replica trusts?)",
            )
        reason = getattr(err, "verify_message", None) or text
        return PeerConnectionFailed(
            UNTRUSTED,
            f"untrusted certificate: the certificate of {self._describe()} is not trusted ({reason})",
        )


def decode_answer(status: int, raw: bytes) -> dict[str, Any]:
    """A replica's answer: its result, or its refusal raised as the replica's own error class."""
    try:
        decoded = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        decoded = None
    if (redirected := redirect_in(decoded, status)) is not None:
        raise redirected
    if status >= 400 or not isinstance(decoded, dict):
        raise error_from_json(decoded, status)
    result = decoded.get("result", {})
    return result if isinstance(result, dict) else {"value": result}


def _looks_like_tls_alert(err: BaseException) -> bool:
    text = f"{err} {err.__cause__ or ''}".lower()
    return any(word in text for word in ("alert", "unknown ca", "certificate", "ssl"))


class Peer:
    """The replication protocol as calls: one method per route of the peer's listener, typed
    requests in and typed answers out (transport/protocol.py). Open with :func:`open_peer`."""

    def __init__(self, client: PeerClient) -> None:
        self._client = client

    @property
    def client(self) -> PeerClient:
        return self._client

    @property
    def address(self) -> PeerAddress:
        return self._client.peer

    async def hello(self) -> answers.HelloAnswer:
        return answers.HelloAnswer.from_json(await self._client.call(p.HELLO))

    async def enable(self, request: p.EnableRequest) -> answers.EnableAnswer:
        return answers.EnableAnswer.from_json(await self._client.call(p.ENABLE, request.to_json()))

    async def boot_file(self, vm_id: str, kind: str, data: AsyncIterator[bytes]) -> None:
        await self._client.call(
            f"{p.BOOT_FILE}?vm_id={vm_id}&kind={kind}", data=data, headers=_STREAM
        )

    async def status(self, request: p.StatusRequest) -> answers.StatusAnswer:
        """Every cycle starts here: in a cluster, this is where the owner is found, and the
        calls that follow on this Peer go to it (transport/redirect.py)."""

        async def call() -> answers.StatusAnswer:
            return answers.StatusAnswer.from_json(
                await self._client.call(p.STATUS, request.to_json())
            )

        return await redirect.following(self._client, request.vm_id, call)

    async def initial_open(
        self, request: p.InitialOpenRequest
    ) -> tuple[answers.InitialOpenAnswer, bytes | None]:
        """The import's port and exports, and for Kerberos the key of its NBD TLS (PSK)."""
        answer = await self._client.call(p.INITIAL_OPEN, request.to_json())
        secret = self._client.secret(p.psk_label(request.vm_id))
        return answers.InitialOpenAnswer.from_json(answer), secret

    async def initial_close(self, request: p.InitialCloseRequest) -> answers.SequenceAnswer:
        answer = await self._client.call(p.INITIAL_CLOSE, request.to_json())
        return answers.SequenceAnswer.from_json(answer)

    async def delta(
        self, vm_id: str, stream: AsyncIterator[bytes], resume: ResumePoint | None = None
    ) -> answers.SequenceAnswer:
        query = f"vm_id={vm_id}" + (f"&resume={resume.query}" if resume else "")
        answer = await self._client.call(f"{p.DELTA}?{query}", data=stream, headers=_STREAM)
        return answers.SequenceAnswer.from_json(answer)

    async def vm_state(self, request: p.VmRequest) -> answers.VmStateAnswer:
        return answers.VmStateAnswer.from_json(
            await self._client.call(p.VM_STATE, request.to_json())
        )

    async def resync_start(self, request: p.ResyncStartRequest) -> answers.SequenceAnswer:
        answer = await self._client.call(p.RESYNC_START, request.to_json())
        return answers.SequenceAnswer.from_json(answer)

    async def resync_hashes(self, request: p.HashesRequest) -> answers.HashesAnswer:
        answer = await self._client.call(p.RESYNC_HASHES, request.to_json())
        return answers.HashesAnswer.from_json(answer)

    async def resync_finish(self, request: p.VmRequest) -> answers.SequenceAnswer:
        answer = await self._client.call(p.RESYNC_FINISH, request.to_json())
        return answers.SequenceAnswer.from_json(answer)

    async def initial_offline(self, request: p.InitialOfflineRequest) -> answers.SequenceAnswer:
        answer = await self._client.call(p.INITIAL_OFFLINE, request.to_json())
        return answers.SequenceAnswer.from_json(answer)

    async def resync_cancel(self, request: p.VmRequest) -> answers.SequenceAnswer:
        answer = await self._client.call(p.RESYNC_CANCEL, request.to_json())
        return answers.SequenceAnswer.from_json(answer)

    async def reverse(self, request: p.ReverseRequest) -> answers.ReverseAnswer:
        """A failback to a cluster's broker name finds the node owning the VM as STATUS does."""

        async def call() -> answers.ReverseAnswer:
            return answers.ReverseAnswer.from_json(
                await self._client.call(p.REVERSE, request.to_json())
            )

        return await redirect.following(self._client, request.vm_id, call)


_STREAM = {"Content-Type": "application/octet-stream"}


@contextlib.asynccontextmanager
async def open_peer(
    address: PeerAddress, creds: PeerCredentials, timeout: float = 30.0
) -> AsyncIterator[Peer]:
    # Imported here: kerberos_peer builds on this module's PeerClient.
    from vmreplica._internal.transport.kerberos_peer import KerberosPeerClient

    client = (
        KerberosPeerClient(address, creds.kerberos, timeout)
        if address.auth == KERBEROS
        else PeerClient(address, creds.tls, timeout)
    )
    async with client:
        yield Peer(client)
