"""The cluster port: what the engine knows of a cluster (docs/CLUSTER.md).

The engine never reaches etcd itself: the agent gives it this when host.toml has `[cluster]`
(`cluster.member.Member` implements it), and None on a host on its own.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol


class ClusterPort(Protocol):
    cluster: str  # the cluster's name
    node: str  # this node's name

    def check(self, vm_id: str, what: str) -> None:
        """Raise (InvalidState) unless this node holds a valid lease and owns `vm_id` now:
        before every write into the VM's replica storage."""

    def writing(self, vm_id: str, storage: Path, what: str) -> AbstractAsyncContextManager[None]:
        """Hold the VM's storage lock (in `storage`, shared by the nodes), then `check`: for
        a whole write into the replica storage, so that a node frozen mid-write and fenced
        meanwhile cannot interleave with the new owner's writes (docs/CLUSTER.md)."""
        ...

    def storage_held(self, storage: Path) -> AbstractAsyncContextManager[None]:
        """Hold a VM's storage lock, without the ownership check: this node's start-up
        recovery of the chains it holds rows for, never while another node writes there."""
        ...

    async def adopt(self, vm_id: str, storage: Path) -> None:
        """Register `vm_id` with the cluster and own it (a new replica: the initial placement
        is the node the primary reached). Raise (InvalidState) if another node owns it."""

    async def owner_address(self, vm_id: str) -> tuple[str, str, int] | None:
        """The node owning `vm_id` and its replication listener (address, port), if another
        node of the cluster owns it and listens; None otherwise."""

    async def publish_settings(self, snapshot: dict[str, Any]) -> int:
        """Make `snapshot` the cluster's replication settings and authorization entries; the
        etcd revision that did."""
        ...

    async def release(self, vm_id: str) -> None:
        """The VM leaves the cluster (its replica was removed)."""

    # -- the primary side: a primary VM owned by one node, moved between nodes (vm move) --

    def owns(self, vm_id: str) -> bool:
        """This node owns `vm_id` under its current lease (as last read)."""
        ...

    def foreign(self, vm_id: str) -> bool:
        """The cluster keeps `vm_id` owned and this node does not own it (as last read)."""
        ...

    async def live_nodes(self) -> list[str]:
        """The names of the cluster's live nodes."""
        ...

    async def owner(self, vm_id: str) -> str | None:
        """The node owning `vm_id` now, if any."""

    async def registered(self) -> dict[str, dict[str, Any]]:
        """The registry: every VM the cluster keeps owned, and what a node needs to serve it."""
        ...

    async def register(self, vm_id: str, info: dict[str, str]) -> None:
        """Put `vm_id` in the registry with `info`."""

    async def take(self, vm_id: str) -> bool:
        """Own `vm_id` if no node does: one txn; False if another node owns it."""
        ...

    async def move(self, vm_id: str, to: str) -> None:
        """Give `vm_id`, which this node owns, to the live node `to`: one txn."""
