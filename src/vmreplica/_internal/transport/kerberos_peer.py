"""The replication client to a replica's Kerberos listener (transport/peer.py has the
certificate one): SPNEGO per call, bodies signed or sealed (transport/signed.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from vmreplica._internal.config import KerberosKeys
from vmreplica._internal.transport import gss, signed
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import PeerAddress, PeerClient, decode_answer


class KerberosPeerClient(PeerClient):
    """The same calls to a replica's Kerberos listener: each one negotiates its own SPNEGO
    exchange (mutual authentication checked before anything else is trusted), then goes with
    its body's MIC, and its answer is accepted only with a MIC that verifies
    (transport/signed.py)."""

    def __init__(self, peer: PeerAddress, keys: KerberosKeys, timeout: float = 30.0) -> None:
        super().__init__(peer, None, timeout)
        self._initiator = _initiator(keys)
        self._last: gss.ClientExchange | None = None

    def secret(self, label: str) -> bytes | None:
        return self._last.secret(label) if self._last is not None else None

    async def call(
        self,
        path: str,
        payload: dict[str, Any] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        exchange = await asyncio.to_thread(self._initiator.start, self.peer.fqdn)
        auth = {"Authorization": f"Negotiate {signed.b64(exchange.token)}"}
        status, raw, answer_headers = await self.post(p.NEGOTIATE, b"", auth)
        if status != 200:
            decode_answer(status, raw)  # the replica's refusal, unsigned: there is no key yet
        scheme, _, reply = answer_headers.get("WWW-Authenticate", "").partition(" ")
        if scheme.lower() != "negotiate":
            raise gss.KerberosFailed(f"Kerberos: {self._describe()} sent no reply token")
        exchange.finish(signed.unb64(reply, "reply token"))
        context = self._verified(exchange, status, raw, answer_headers).get("context")
        if not isinstance(context, str):
            raise gss.KerberosFailed(f"Kerberos: {self._describe()} named no context")
        body = data if data is not None else json.dumps(payload or {}).encode()
        extra = {signed.CONTEXT_HEADER: context}
        sign = lambda digest: exchange.mic(signed.request_message("POST", path, digest))  # noqa: E731
        if self.peer.encrypt:
            extra[signed.PROTECTION_HEADER] = signed.SEALED
            sent = signed.sealed_body(body, exchange.wrap, sign)
        else:
            sent = signed.signed_body(body, sign)
        status, raw, answer_headers = await self.post(path, sent, {**(headers or {}), **extra})
        if self.peer.encrypt and answer_headers.get(signed.PROTECTION_HEADER) == signed.SEALED:
            return self._opened(exchange, status, raw)
        if self.peer.encrypt and status < 400:
            raise gss.KerberosFailed(
                f"tampered answer: the answer of {self._describe()} is not sealed"
            )
        answer = self._verified(exchange, status, raw, answer_headers)
        self._last = exchange
        return answer

    def _opened(self, exchange: gss.ClientExchange, status: int, raw: bytes) -> dict[str, Any]:
        answer = decode_answer(status, signed.open_answer(status, raw, exchange.unwrap))
        self._last = exchange
        return answer

    def _verified(
        self, exchange: gss.ClientExchange, status: int, raw: bytes, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        mic = headers.get(signed.MIC_HEADER)
        if mic is None:
            if status >= 400:
                decode_answer(status, raw)  # a refusal before the context was known
            raise gss.KerberosFailed(
                f"tampered answer: the answer of {self._describe()} has no MIC"
            )
        exchange.verify(signed.answer_message(status, raw), signed.unb64(mic, "answer MIC"))
        return decode_answer(status, raw)


_INITIATORS: dict[KerberosKeys, gss.Initiator] = {}


def _initiator(keys: KerberosKeys) -> gss.Initiator:
    """One per identity for the agent's life: its ticket cache outlives any one connection."""
    return _INITIATORS.setdefault(keys, gss.Initiator(keys))
