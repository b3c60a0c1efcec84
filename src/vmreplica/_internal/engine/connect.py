"""``replication test-connection``: can this host replicate to a given replica server?"""

from __future__ import annotations

from vmreplica._internal import validate
from vmreplica._internal.config import HostConfig
from vmreplica._internal.models import ConnectionTest
from vmreplica._internal.transport.peer import (
    UNREACHABLE,
    PeerAddress,
    PeerConnectionFailed,
    open_peer,
)
from vmreplica.errors import AccessDenied, InvalidArgument, InvalidState, VmrError

NOT_AUTHORIZED = "not authorized"
REPLICATION_DISABLED = "replication disabled"


def peer_address(config: HostConfig, replica_server: str, port: int) -> PeerAddress:
    fqdn = validate.fqdn(replica_server, "replica server")
    return PeerAddress(
        fqdn=fqdn, address=config.resolve_address(fqdn), port=validate.port(port, "replica port")
    )


async def test_connection(
    config: HostConfig, replica_server: str, port: int, auth: str
) -> ConnectionTest:
    if auth.lower() != "certificate":
        raise InvalidArgument(
            f"{auth} authentication is not available in this version of vmreplica: use --auth certificate"
        )
    peer = peer_address(config, replica_server, port)
    outcome = {"reachable": False, "tls_ok": False, "authorized": False}
    entry = group = reason = None
    try:
        async with open_peer(peer, config.tls, timeout=10) as replica:
            answer = await replica.hello()
        outcome = {"reachable": True, "tls_ok": True, "authorized": True}
        entry, group = answer.authorization_entry, answer.trust_group
    except PeerConnectionFailed as e:
        outcome["reachable"] = e.stage != UNREACHABLE
        reason = e.message
    except AccessDenied as e:
        outcome = {"reachable": True, "tls_ok": True, "authorized": False}
        reason = e.message
    except InvalidState as e:
        outcome = {"reachable": True, "tls_ok": True, "authorized": False}
        reason = (
            e.message
            if e.message.startswith(REPLICATION_DISABLED)
            else f"{REPLICATION_DISABLED}: {e.message}"
        )
    except VmrError as e:
        outcome = {"reachable": True, "tls_ok": True, "authorized": False}
        reason = e.message
    return ConnectionTest(
        computer_name=config.name,
        replica_server=peer.fqdn,
        replica_port=peer.port,
        authentication_type="certificate",
        authorization_entry=entry,
        trust_group=group,
        reason=reason,
        **outcome,
    )
