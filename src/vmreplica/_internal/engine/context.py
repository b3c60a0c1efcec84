"""What every part of the engine works with: the configuration, the stores, the event log, the
journal, the hypervisor driver, per-VM locks, and the one way to change a relationship's state."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable
from typing import Unpack

from vmreplica._internal.config import HostConfig
from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.engine.journal import Journal
from vmreplica._internal.engine.states import Command, Side, State, transition
from vmreplica._internal.ports.cluster import ClusterPort
from vmreplica._internal.ports.hypervisor import HypervisorDriver
from vmreplica._internal.store.db import Tx
from vmreplica._internal.store.replications import ReplicationRow, RowChanges
from vmreplica._internal.store.stores import Stores


class Locks:
    """Per-VM locks, by purpose. ``vm``: the VM's processes and disks (start, stop, a cycle's
    cut); ``replica``: a replica's chains; ``cycle``: one cut at a time; ``send``: one sender;
    ``stream``: one incoming delta."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _get(self, purpose: str, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault((purpose, vm_id), asyncio.Lock())

    def vm(self, vm_id: str) -> asyncio.Lock:
        return self._get("vm", vm_id)

    def replica(self, vm_id: str) -> asyncio.Lock:
        return self._get("replica", vm_id)

    def cycle(self, vm_id: str) -> asyncio.Lock:
        return self._get("cycle", vm_id)

    def send(self, vm_id: str) -> asyncio.Lock:
        return self._get("send", vm_id)

    def stream(self, vm_id: str) -> asyncio.Lock:
        """A replica's incoming delta stream: one at a time; taken before ``replica``."""
        return self._get("stream", vm_id)


@dataclasses.dataclass
class Context:
    config: HostConfig
    stores: Stores
    events: EventLog
    journal: Journal
    driver: HypervisorDriver
    locks: Locks = dataclasses.field(default_factory=Locks)
    # Peers refused since the agent started, by reason (``no-entry``, ``replication-disabled``,
    # ``trust-group``, ``seed-primary``): exported as metrics.
    refusals: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # This host's certificate listener port, if it listens: a replica needs it to check for
    # split brain and to reverse replication later. The agent sets it.
    # The port of this host's listener for an authentication type, None if it is closed.
    own_port: Callable[[str], int | None] = lambda auth: None
    # The cluster this host is a node of (docs/CLUSTER.md); None: a host on its own.
    cluster: ClusterPort | None = None

    @property
    def host(self) -> str:
        return self.config.name


def allows(row: ReplicationRow, command: Command) -> State:
    """The state ``command`` would lead to, or the refusal that says what the state allows."""
    return transition(Side(row.mode), State(row.state), command, row.vm_name)


def move(
    ctx: Context, tx: Tx, row: ReplicationRow, command: Command, **changes: Unpack[RowChanges]
) -> State:
    """Change the relationship's state by ``command`` (engine/states.py), with other fields in
    the same transaction. Every change of state goes through here."""
    target = allows(row, command)
    ctx.stores.replications.set_state(row.vm_id, tx, target)
    if changes:
        ctx.stores.replications.update(row.vm_id, tx, **changes)
    return target
