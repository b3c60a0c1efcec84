"""Redirects on the data path, in a cluster (docs/CLUSTER.md).

A primary replicates to the Replica Broker's name; whichever node answers that name may not own
the VM. That node answers 421 (Misdirected Request) naming the owner's address and port, and the
primary calls the owner instead, presenting the same TLS server name (every node's certificate
carries the broker's name), so a redirect can only lead to another holder of that name. The
primary remembers the owner per (name, port, VM) for the next cycles, and goes back to the
broker's name when the owner stops answering or redirects again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from vmreplica.errors import ConnectionFailed, InvalidState, VmrError

T = TypeVar("T")

MISDIRECTED = 421


class Misdirected(InvalidState):
    """The replica side's answer: this node does not own the VM; `node` at `address:port` does."""

    http_status = MISDIRECTED

    def __init__(self, vm_id: str, node: str, address: str, port: int) -> None:
        super().__init__(f"VM {vm_id} is owned by node {node} of the cluster ({address}:{port})")
        self.node, self.address, self.port = node, address, port

    def to_json(self) -> dict[str, Any]:
        return super().to_json() | {
            "redirect": {"node": self.node, "address": self.address, "port": self.port}
        }


@dataclass(frozen=True)
class Owner:
    node: str
    address: str
    port: int


class Redirected(ConnectionFailed):
    """The primary side's view of a Misdirected answer."""

    def __init__(self, message: str, owner: Owner) -> None:
        super().__init__(message)
        self.owner = owner


def redirect_in(decoded: object, status: int) -> Redirected | None:
    """A 421 answer with a well-formed redirect, else None (trust nothing of its shape)."""
    if status != MISDIRECTED or not isinstance(decoded, dict):
        return None
    r, err = decoded.get("redirect"), decoded.get("error")
    if not isinstance(r, dict) or not isinstance(err, dict):
        return None
    node, address, port = r.get("node"), r.get("address"), r.get("port")
    if not (isinstance(node, str) and isinstance(address, str) and isinstance(port, int)):
        return None
    if not (0 < port < 65536 and address.isprintable() and 0 < len(address) <= 255):
        return None
    return Redirected(str(err.get("message", "redirected")), Owner(node, address, port))


# The owner a redirect named, per (replica server name, port, VM id): this process's memory.
_owners: dict[tuple[str, int, str], Owner] = {}


def remembered(fqdn: str, port: int, vm_id: str) -> Owner | None:
    return _owners.get((fqdn, port, vm_id))


def remember(fqdn: str, port: int, vm_id: str, owner: Owner | None) -> None:
    if owner is None:
        _owners.pop((fqdn, port, vm_id), None)
    else:
        _owners[(fqdn, port, vm_id)] = owner


class _Client(Protocol):
    peer: Any  # a transport.peer.PeerAddress


async def following(client: _Client, vm_id: str, call: Callable[[], Awaitable[T]]) -> T:
    """`call` (STATUS) at the owner remembered for this VM if any, else at the name; a redirect
    is followed once, and the client stays pointed at the node that answered."""
    home = client.peer
    owner = remembered(home.fqdn, home.port, vm_id)
    if owner is not None:
        client.peer = replace(home, address=owner.address, port=owner.port)
        try:
            return await call()
        except VmrError:  # gone, moved, not the owner any more: ask the name again
            remember(home.fqdn, home.port, vm_id, None)
            client.peer = home
    try:
        return await call()
    except Redirected as r:
        client.peer = replace(home, address=r.owner.address, port=r.owner.port)
        answer = await call()
        remember(home.fqdn, home.port, vm_id, r.owner)
        return answer
