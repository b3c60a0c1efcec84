"""``replication test-connection``: can this host replicate to a given replica server?"""

from __future__ import annotations

from vmreplica._internal import validate
from vmreplica._internal.config import HostConfig
from vmreplica._internal.models import ConnectionTest
from vmreplica._internal.store.replications import ReplicationRow
from vmreplica._internal.transport.gss import KerberosFailed
from vmreplica._internal.transport.peer import (
    CERTIFICATE,
    KERBEROS,
    UNREACHABLE,
    PeerAddress,
    PeerConnectionFailed,
    open_peer,
)
from vmreplica.errors import AccessDenied, InvalidArgument, InvalidState, VmrError

NOT_AUTHORIZED = "not authorized"
REPLICATION_DISABLED = "replication disabled"


def authentication_type(value: str) -> str:
    auth = value.lower()
    if auth not in (CERTIFICATE, KERBEROS):
        raise InvalidArgument(f"invalid authentication type {value!r}: use kerberos or certificate")
    return auth


def peer_address(
    config: HostConfig, replica_server: str, port: int, auth: str = CERTIFICATE,
    encrypt: bool = False,
) -> PeerAddress:  # fmt: skip
    fqdn = validate.fqdn(replica_server, "replica server")
    return PeerAddress(
        fqdn=fqdn, address=config.resolve_address(fqdn), port=validate.port(port, "replica port"),
        auth=authentication_type(auth), encrypt=encrypt,
    )  # fmt: skip


def replica_address(config: HostConfig, row: ReplicationRow) -> PeerAddress:
    """Where and how a primary reaches its replica."""
    return peer_address(
        config, row.replica_server, row.replica_port, row.authentication_type,
        row.settings.encrypt,
    )  # fmt: skip


async def test_connection(
    config: HostConfig, replica_server: str, port: int, auth: str
) -> ConnectionTest:
    peer = peer_address(config, replica_server, port, auth)
    kerberos = peer.auth == KERBEROS
    # For Kerberos, the stage after "reachable" is the SPNEGO exchange instead of TLS.
    passed = {"reachable": True, "tls_ok": not kerberos, "authorized": False}
    outcome = {"reachable": False, "tls_ok": False, "authorized": False}
    entry = group = reason = None
    exchanged = True  # false for a failure of the Kerberos exchange or before it
    try:
        async with open_peer(peer, config.credentials, timeout=10) as replica:
            answer = await replica.hello()
        outcome = passed | {"authorized": True}
        entry, group = answer.authorization_entry, answer.trust_group
    except PeerConnectionFailed as e:
        outcome["reachable"] = e.stage != UNREACHABLE
        reason, exchanged = e.message, False
    except KerberosFailed as e:
        reason, exchanged = e.message, False
    except AccessDenied as e:
        # The replica refuses either the Kerberos exchange or, once it passed, the host.
        exchanged = e.message.startswith(NOT_AUTHORIZED) or not kerberos
        outcome = passed if exchanged else outcome | {"reachable": True}
        reason = e.message
    except InvalidState as e:
        outcome = passed
        reason = (
            e.message
            if e.message.startswith(REPLICATION_DISABLED)
            else f"{REPLICATION_DISABLED}: {e.message}"
        )
    except VmrError as e:
        outcome = passed
        reason = e.message
    return ConnectionTest(
        computer_name=config.name,
        replica_server=peer.fqdn,
        replica_port=peer.port,
        authentication_type=peer.auth,
        authorization_entry=entry,
        trust_group=group,
        reason=reason,
        kerberos_ok=exchanged if kerberos else None,
        **outcome,
    )
