"""Kerberos through GSSAPI (Debian's ``python3-gssapi`` over MIT Kerberos): SPNEGO contexts with
mutual authentication, and MICs over message digests. No Kerberos is done by hand here: tickets,
authenticators, clock-skew and expiry checks and the MIC arithmetic are the library's.

Two things are this module's own, each because the library leaves it to the application:

- **Replays.** MIT's acceptor consults its replay cache only for requests *without* mutual
  authentication (a replayed mutual exchange cannot complete on the sender's side); a replica
  that applied a replayed request before the exchange completed would still have acted on it. So
  :class:`Acceptor` keeps the digest of every token it accepted for the realm's clock-skew window
  (which bounds how long an authenticator can be accepted at all) and refuses one seen before.
- **Names.** The sender's identity is the host name in its principal (``host/FQDN@REALM`` or
  ``HTTP/FQDN@REALM``), of this host's realm only; authorization entries then apply to that name
  exactly as to the names of a certificate.

Every failure is one line naming its cause: :class:`AccessDenied` on the accepting side,
:class:`KerberosFailed` on the initiating side.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gssapi.creds import Credentials
from gssapi.names import Name
from gssapi.raw.ext_ggf import inquire_sec_context_by_oid
from gssapi.raw.misc import GSSError
from gssapi.raw.oids import OID
from gssapi.raw.types import NameType, RequirementFlag
from gssapi.sec_contexts import SecurityContext

from vmreplica._internal.config import KerberosKeys
from vmreplica.errors import AccessDenied, ConnectionFailed, VmrError

SPNEGO = OID.from_int_seq("1.3.6.1.5.5.2")
_FLAGS = (
    RequirementFlag.mutual_authentication
    | RequirementFlag.integrity
    | RequirementFlag.confidentiality
    | RequirementFlag.replay_detection
    | RequirementFlag.out_of_sequence_detection
)
SERVICES = ("host", "HTTP")  # the service principals a replica accepts for its FQDN
# MIT's default clock skew is 300 s: an authenticator is acceptable for at most that long either
# side of its time, so a digest older than twice that can never match an acceptable token again.
REPLAY_WINDOW = 600.0
_MINOR = re.compile(r"Minor \(\d+\): (.*)$", re.S)
_SESSION_KEY = OID.from_int_seq("1.2.840.113554.1.2.2.5.5")  # GSS_C_INQ_SSPI_SESSION_KEY


def _secret(context: SecurityContext, label: str) -> bytes:
    """A key both sides of one exchange derive alike, for ``label``, from its session key."""
    key = bytes(inquire_sec_context_by_oid(context, _SESSION_KEY)[0])
    return hashlib.sha256(b"vmreplica secret\0" + label.encode() + b"\0" + key).digest()


def _wrap(context: SecurityContext, data: bytes) -> bytes:
    result = context.wrap(data, True)
    if not result.encrypted:
        raise AccessDenied("Kerberos: the GSS context cannot encrypt (no confidentiality)")
    return bytes(result.message)


def _unwrap(context: SecurityContext, token: bytes) -> bytes:
    result = context.unwrap(token)
    if not result.encrypted:
        raise AccessDenied("tampered body: a sealed frame was not encrypted")
    return bytes(result.message)


class KerberosFailed(ConnectionFailed):
    """This host could not start or finish a Kerberos exchange with a replica."""


def describe(err: GSSError) -> str:
    """The library's own words for a failure: the minor (mechanism) message when there is one."""
    text = str(err)
    found = _MINOR.search(text)
    minor = found.group(1).strip() if found else ""
    if minor and minor.lower() != "success":
        return minor
    return err.gen_message().split(", Minor")[0] if hasattr(err, "gen_message") else text


def check_keytab(keytab: Path) -> None:
    """A keytab that is missing or unreadable is named as such before GSSAPI reports it vaguely."""
    try:
        with open(keytab, "rb") as f:
            f.read(1)
    except OSError as e:
        raise AccessDenied(
            f"missing or unreadable keytab {keytab}: {e.strerror or e} "
            "(set it with `host init --keytab PATH`)"
        ) from None


@dataclass(frozen=True)
class Principal:
    service: str | None  # None for a user principal (no slash)
    host: str
    realm: str

    @classmethod
    def parse(cls, text: str) -> Principal:
        name, _, realm = text.rpartition("@") if "@" in text else (text, "", "")
        service, slash, host = name.partition("/")
        if not slash:
            return cls(None, name, realm)
        return cls(service, host.lower(), realm)

    def __str__(self) -> str:
        name = f"{self.service}/{self.host}" if self.service else self.host
        return f"{name}@{self.realm}" if self.realm else name


class _Exchange:
    """What both sides of an established exchange do with it: MICs, wrap tokens, a derived key.
    A MIC or a token that does not verify is refused in the words of the side that got it."""

    context: SecurityContext

    def _tampered(self, what: str) -> VmrError:
        raise NotImplementedError

    def mic(self, data: bytes) -> bytes:
        return bytes(self.context.get_signature(data))

    def secret(self, label: str) -> bytes:
        return _secret(self.context, label)

    def wrap(self, data: bytes) -> bytes:
        return _wrap(self.context, data)

    def unwrap(self, token: bytes) -> bytes:
        try:
            return _unwrap(self.context, token)
        except GSSError as e:
            raise self._tampered(f"a sealed frame does not unwrap ({describe(e)})") from None

    def verify(self, data: bytes, mic: bytes) -> None:
        try:
            self.context.verify_signature(data, mic)
        except GSSError as e:
            raise self._tampered(f"the GSS MIC does not verify ({describe(e)})") from None


class ClientExchange(_Exchange):
    """One SPNEGO exchange as the sender: :attr:`token` goes to the replica, whose reply token
    :meth:`finish` checks (mutual authentication) before any MIC is made or trusted."""

    def __init__(self, context: SecurityContext, target: str) -> None:
        self.context = context
        self.target = target
        self.token: bytes = b""

    def finish(self, reply: bytes) -> None:
        try:
            self.context.step(reply)
            complete = self.context.complete
        except GSSError as e:
            raise KerberosFailed(
                f"Kerberos: the reply of {self.target} failed mutual authentication ({describe(e)})"
            ) from None
        if not complete:
            raise KerberosFailed(f"Kerberos: {self.target} did not complete mutual authentication")

    def _tampered(self, what: str) -> VmrError:
        return KerberosFailed(f"tampered answer from {self.target}: {what}")


class Initiator:
    """This host's Kerberos identity as a sender: a ticket-granting ticket obtained from its
    keytab into a private in-memory cache (renewed by the library from the keytab)."""

    def __init__(self, keys: KerberosKeys) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._creds: Credentials | None = None

    def _credentials(self) -> Credentials:
        check_keytab(self._keys.keytab)
        with self._lock:
            if self._creds is None:
                name = Name(self._keys.principal, NameType.kerberos_principal)
                try:
                    self._creds = Credentials(
                        name=name, usage="initiate",
                        store={
                            "client_keytab": str(self._keys.keytab),
                            "ccache": f"MEMORY:vmreplica-{os.getpid()}-{id(self)}",
                        },
                    )  # fmt: skip
                except GSSError as e:
                    raise KerberosFailed(
                        _client_reason(
                            self._keys.principal, f"keytab {self._keys.keytab}", describe(e)
                        )
                    ) from None
            return self._creds

    def start(self, fqdn: str) -> ClientExchange:
        """Blocking (it may ask the KDC for a ticket): call it in a worker thread."""
        creds = self._credentials()
        failures = []
        for service in SERVICES:
            target = f"{service}/{fqdn}"
            context = SecurityContext(
                name=Name(target, NameType.kerberos_principal),
                creds=creds, usage="initiate", mech=SPNEGO, flags=_FLAGS,
            )  # fmt: skip
            exchange = ClientExchange(context, target)
            try:
                exchange.token = bytes(context.step())
                _ = context.complete  # raises a failure step() kept
                return exchange
            except GSSError as e:
                reason = describe(e)
                if reason.startswith("Server ") and "not found" in reason:
                    failures.append(reason)
                    continue  # the replica may have only the other service principal
                raise KerberosFailed(_client_reason(self._keys.principal, target, reason)) from None
        raise KerberosFailed(
            f"unknown principal: neither host/{fqdn} nor HTTP/{fqdn} is known to the KDC "
            f"({failures[-1]})"
        )


def _client_reason(principal: str, where: str, reason: str) -> str:
    low = reason.lower()
    if "client" in low and "not found" in low:
        return f"unknown principal: {principal} (this host) is not known to the KDC ({reason})"
    if "clock skew" in low:
        return f"clock skew: this host's clock is too far from the KDC's ({reason})"
    if "expired" in low:
        return f"expired ticket: the Kerberos credentials of {principal} expired ({reason})"
    return f"Kerberos: cannot authenticate {principal} with {where} ({reason})"


@dataclass
class ServerExchange(_Exchange):
    """One accepted exchange: who sent it, the reply token for it, and its MIC operations."""

    context: SecurityContext
    reply: bytes
    principal: Principal

    def _tampered(self, what: str) -> VmrError:
        return AccessDenied(f"tampered body from {self.principal}: {what}")


class Acceptor:
    """This host's Kerberos identity as a replica: any key of its keytab, for a ticket whose
    service is ``host/`` or ``HTTP/`` and this host's FQDN."""

    def __init__(self, keys: KerberosKeys, fqdn: str) -> None:
        self._keys = keys
        self._fqdn = fqdn.lower()
        self._realm = Principal.parse(keys.principal).realm
        self._seen: dict[bytes, float] = {}
        self._creds: Credentials | None = None

    def check(self) -> None:
        """The keytab can serve (called when the Kerberos listener opens)."""
        self._credentials()

    def _credentials(self) -> Credentials:
        check_keytab(self._keys.keytab)
        if self._creds is None:
            try:
                self._creds = Credentials(usage="accept", store={"keytab": str(self._keys.keytab)})
            except GSSError as e:
                raise AccessDenied(
                    f"missing or unreadable keytab {self._keys.keytab}: {describe(e)}"
                ) from None
        return self._creds

    def accept(self, token: bytes) -> ServerExchange:
        digest = hashlib.sha256(token).digest()
        now = time.monotonic()
        if digest in self._seen:
            raise AccessDenied(
                "replayed authenticator: this Kerberos token was already used (a captured "
                "request sent again is refused)"
            )
        context = SecurityContext(creds=self._credentials(), usage="accept")
        try:
            # python-gssapi may keep a failure of step() and raise it at the next attribute.
            reply = context.step(token)
            complete = context.complete
            initiator = str(context.initiator_name) if complete else ""
            target = str(context.target_name) if complete and context.target_name else ""
        except GSSError as e:
            raise AccessDenied(_server_reason(describe(e))) from None
        if not complete:
            raise AccessDenied("Kerberos: the exchange needs more than one token (not Kerberos?)")
        self._remember(digest, now)
        principal = Principal.parse(initiator)
        service = Principal.parse(target) if target else None
        if service is None or service.service not in SERVICES or service.host != self._fqdn:
            raise AccessDenied(
                f"Kerberos: the ticket is for {service}, not host/{self._fqdn} or HTTP/{self._fqdn}"
            )
        realm = self._realm or service.realm
        if principal.realm != realm:
            raise AccessDenied(
                f"principal of another realm: {principal} is of realm {principal.realm}; this "
                f"host accepts principals of {realm} only"
            )
        if principal.service not in SERVICES:  # a user's (alice/admin), or another service's
            raise AccessDenied(
                f"unknown principal: {principal} is not a host principal (host/FQDN@{realm} or "
                f"HTTP/FQDN@{realm})"
            )
        return ServerExchange(context, bytes(reply or b""), principal)

    def _remember(self, digest: bytes, now: float) -> None:
        if len(self._seen) > 1024:
            self._seen = {d: t for d, t in self._seen.items() if now - t < REPLAY_WINDOW}
        self._seen[digest] = now


def _server_reason(reason: str) -> str:
    low = reason.lower()
    if "clock skew" in low:
        return f"clock skew: the sender's clock is beyond the realm's limit from this host's ({reason})"
    if "expired" in low:
        return f"expired ticket: the sender's Kerberos ticket has expired ({reason})"
    if "replay" in low:
        return f"replayed authenticator: {reason}"
    if "keytab" in low or "key table" in low:
        return f"Kerberos: this host has no key for the ticket's service ({reason})"
    return f"Kerberos: the sender's token was refused ({reason})"
