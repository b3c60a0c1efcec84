"""Helpers shared by the cluster tests (test_cluster_redirect, test_cluster_move,
test_cluster_topology): a TCP proxy standing in for a floating address, the owners a cluster's
etcd records, and `Env`, a primary VM on shared storage replicating to a replica (one host or a
replica cluster) with the checks that a cycle was a verified delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

from tests.integration.replication_env import PRIMARY, Pair, same_content, verified_equal, wait_for
from tests.localcluster import Cluster, free_port
from vmreplica._internal.drivers.qemu.chain import ReplicaChain

TIMEOUT = 300.0  # generous: the machine is shared and loaded


class Proxy:
    """Forwards every connection to `target` (switchable) on 127.0.0.1; counts connections.

    A target that refuses (its node is down) closes that one client connection, as a floating
    address leading to a dead node would; the proxy keeps accepting."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()


def owned(c: Cluster, node: str) -> list[str]:
    """The VMs `node` owns, as its cluster's etcd says (the CLI reads it with `node`'s config)."""
    rows = c.cli_json(
        "cluster", "node", "list", "--config", str(c.hosts[node].config), "-o", "json"
    )
    return [vm for r in rows if r["name"] == node for vm in r["owned_vms"]]


def serve_replica_cluster(c: Cluster, first: str, second: str) -> tuple[int, int, Path]:
    """Nodes `first` and `second` of a replica cluster accept PRIMARY into one shared storage,
    set on `first` and applied on `second` through etcd; their replication ports and it."""
    port1, port2 = c.hosts[first].replica_port, c.hosts[second].replica_port
    c.cli("server", "set", "--certificate-port", str(port2), host=second)
    c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
          str(port1), host=first)  # fmt: skip
    storage = c.base / "shared-storage"
    c.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location", str(storage),
          "--trust-group", "Production", host=first)  # fmt: skip
    wait_for(lambda: bool(c.cli_json("auth", "get", "-o", "json", host=second)), 15,
             "the entry on the other node")  # fmt: skip
    wait_for(
        lambda: c.cli_json("server", "get", "-o", "json", host=second)[0]["replication_enabled"],
        15, "the other node listening",
    )  # fmt: skip
    return port1, port2, storage


def replicate_app(c: Cluster, broker: str, port: int, storage: Path, *extra: str) -> Pair:
    """VM "app" on PRIMARY, running with 1 MiB written, replicating to `broker` at `port`
    (`extra`: more `replication enable` options), its initial copy verified."""
    pair = Pair(c, port, storage)
    c.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    c.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "1M")
    c.cli("replication", "enable", "app", "--replica-server", broker, "--replica-port",
          str(port), "--auth", "certificate", *extra, host=PRIMARY)  # fmt: skip
    pair.start("app")
    verified_equal(pair)
    return pair


class Env:
    """The VM `app`, its disk `disk` on the primaries' shared storage, replicated to `replica`
    (the host whose database holds the replica's row: the owning node in a replica cluster) with
    its chains under `storage`."""

    def __init__(
        self, c: Cluster, storage: Path, disk: Path, replica: str, primaries: tuple[str, ...]
    ) -> None:
        self.c = c
        self.storage = storage
        self.disk = disk
        self.replica = replica
        self.primaries = primaries

    def cli(self, *args: str, host: str, check: bool = True) -> Any:
        return self.c.cli(*args, host=host, check=check, timeout=TIMEOUT)

    def json(self, *args: str, host: str) -> list[dict[str, Any]]:
        rows = self.c.cli(*args, "-o", "json", host=host, timeout=TIMEOUT).json()
        assert isinstance(rows, list)
        return rows

    def vms(self, host: str) -> list[str]:
        return [v["name"] for v in self.json("vm", "list", host=host)]

    def write(self, host: str, pattern: int, offset: str, length: str = "256k") -> None:
        out = self.cli("vm", "monitor", "app", f'qemu-io disk0 "write -P {pattern:#x} {offset} '
                       f'{length}"', host=host).stdout  # fmt: skip
        assert "wrote" in out, out

    def reads(self, host: str, pattern: int, offset: str, length: str = "256k") -> bool:
        out = self.cli("vm", "monitor", "app", f'qemu-io disk0 "read -P {pattern:#x} {offset} '
                       f'{length}"', host=host).stdout  # fmt: skip
        return "read" in out and "Pattern verification failed" not in out

    def synced(self, host: str) -> dict[str, Any]:
        """One cycle on `host`; the replica took it as a delta (its sequence follows the
        primary's), verifies, and reads as the primary's disk does."""
        before = self.sequence(self.replica)
        self.cli("replication", "sync", "app", host=host)
        row = self.json("replication", "get", "app", host=host)[0]
        assert row["state"] == "Replicating", row
        assert self.sequence(self.replica) == self.sequence(host) > before
        # A delta of what was written (256 KiB), not a copy of the disk.
        size = self.json("replication", "measure", "app", host=host)[0]["last_replication_size"]
        assert 0 < size < 2 << 20, size
        self.cli("vm", "monitor", "app", 'qemu-io disk0 "flush"', host=host)
        tip = self.storage / "app" / "disk0" / "tip.qcow2"
        asyncio.run(ReplicaChain(tip.parent).verify())
        assert same_content(self.disk, tip)
        return row

    def sequence(self, host: str) -> int:
        """The relationship's sequence as `host`'s database has it (read-only)."""
        db = self.c.hosts[host].state_dir / "state.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            (value,) = con.execute("SELECT sequence FROM replications").fetchone()
        return int(value)

    def move(self, to: str, host: str, *extra: str) -> dict[str, Any]:
        out = self.json("vm", "move", "app", "--to", to, "--force", *extra, host=host)[0]
        assert out["target"] == to and out["state"] == "Running", out
        return out

    def owners(self) -> dict[str, list[str]]:
        """The primary cluster's live nodes and the VMs each owns."""
        node = self.primaries[-1]
        rows = self.json("cluster", "node", "list", "--config", str(self.c.hosts[node].config),
                         host=node)  # fmt: skip
        return {r["name"]: r["owned_vms"] for r in rows}

    def kinds(self, host: str) -> set[str]:
        return {e["kind"] for e in self.json("event", "list", host=host)}

    def no_resync(self, *hosts: str) -> None:
        for host in hosts or (*self.primaries, self.replica):
            kinds = self.kinds(host)
            assert not {k for k in kinds if "resync" in k}, (host, kinds)
