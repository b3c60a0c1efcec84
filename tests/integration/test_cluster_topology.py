"""The whole topology of a clustered replication (docs/CLUSTER.md): a primary cluster `p` of two
nodes (their VM's disk on a directory both use, the broker name `pbroker.test`) replicating to a
replica cluster `r` of three nodes (one replica storage directory for all three, the broker
name `rbroker.test`), both clusters on one real 3-member etcd, every agent on loopback.

The replica cluster's name is the TCP proxy of tests/integration/cluster_env.py, standing in for
a floating address. The primary VM moves between its nodes while its guest writes and cycles
run; then the replica node owning the replica VM is killed with -9 and another takes it over
from the shared storage; replication goes on by deltas, without a resync, and every record
written before each step is on the primary's disk and in the replica's chain, which verifies
and equals the disk (`qemu-img compare`).
"""

from __future__ import annotations

import functools
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import tomli_w

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import Env, Proxy, owned
from tests.integration.replication_env import wait_for
from tests.localcluster import Cluster

A, B = "pnode1", "pnode2"  # the primary cluster `p`
R1, R2, R3 = "rnode1", "rnode2", "rnode3"  # the replica cluster `r`
PBROKER, RBROKER = "pbroker.test", "rbroker.test"
WAIT = 120.0  # generous: the machine is shared and loaded


@pytest.fixture
def five() -> Iterator[Cluster]:
    c = Cluster.create(names=(A, B, R1, R2, R3))
    try:
        yield c
    finally:
        c.close()


def clusters(c: Cluster, etcd: EtcdCluster) -> None:
    """Both clusters on the one etcd, each node's certificate carrying its cluster's broker."""
    for node in (A, B):  # the primaries reach the replica cluster by its name
        config = tomllib.loads(c.hosts[node].config.read_text())
        config["resolve"][RBROKER] = "127.0.0.1"
        c.hosts[node].config.write_text(tomli_w.dumps(config))
    for name, nodes, broker in (("p", (A, B), PBROKER), ("r", (R1, R2, R3), RBROKER)):
        member = ("--name", name, "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", "3")
        c.cli("cluster", "init", "--config", str(c.hosts[nodes[0]].config), *member)
        for node in nodes[1:]:
            c.cli("cluster", "join", "--config", str(c.hosts[node].config), *member)
        for node in nodes:
            c.cli("cluster", "broker", "add", "--config", str(c.hosts[node].config), "--name",
                  broker, "--ca", str(c.ca_dir))  # fmt: skip
    c.start_all()


def replica_server(c: Cluster) -> None:
    """Each replica node its own port; the settings and the one entry, naming the primary
    cluster's broker, set once on rnode1 and taken by the other two."""
    for node in (R2, R3):
        c.cli("server", "set", "--certificate-port", str(c.hosts[node].replica_port), host=node)
    c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
          str(c.hosts[R1].replica_port), host=R1)  # fmt: skip
    c.cli("auth", "new", "--allowed-primary", PBROKER, "--storage-location",
          str(c.base / "replica-shared"), "--trust-group", "Production", host=R1)  # fmt: skip

    def serving(node: str) -> bool:
        enabled = c.cli_json("server", "get", "-o", "json", host=node)[0]["replication_enabled"]
        return bool(enabled) and bool(c.cli_json("auth", "get", "-o", "json", host=node))

    for node in (R2, R3):
        wait_for(functools.partial(serving, node), WAIT, f"{node} taking the cluster's settings")


@dataclass
class Load:
    """The guest writes a 256 KiB record, then a cycle runs, again and again, on whichever
    primary node runs the VM: during a move one of the two is refused, nothing else."""

    env: Env
    records: list[tuple[int, str]] = field(default_factory=list)  # acknowledged writes
    cycles: dict[str, int] = field(default_factory=lambda: {A: 0, B: 0})
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for i in range(64):  # 8 MiB .. 24 MiB, until stopped
            if self.stop.is_set():
                return
            pattern, offset = 0x40 + i, f"{8192 + 256 * i}k"
            for host in (A, B):
                out = self.env.cli("vm", "monitor", "app", f'qemu-io disk0 "write -P '
                                   f'{pattern:#x} {offset} 256k"', host=host, check=False)  # fmt: skip
                if out.returncode == 0 and "wrote" in out.stdout:
                    self.records.append((pattern, offset))
                    if self.env.cli("replication", "sync", "app", host=host, check=False) \
                            .returncode == 0:  # fmt: skip
                        self.cycles[host] += 1
                    break
            else:
                self.stop.wait(0.5)  # neither runs the VM this instant: the move's handover


def test_a_primary_cluster_replicates_to_a_replica_cluster_through_a_move_and_a_takeover(
    five: Cluster, etcd: EtcdCluster
) -> None:
    c = five
    clusters(c, etcd)
    replica_server(c)
    shared = c.base / "primary-shared"
    shared.mkdir()
    disk = shared / "app.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    env = Env(c, c.base / "replica-shared", disk, R1, (A, B))
    proxy = Proxy(c.hosts[R1].replica_port)  # the name leads to rnode1
    try:
        env.cli("vm", "new", "app", "--disk-path", str(disk), host=A)
        env.cli("vm", "start", "app", host=A)
        env.write(A, 0x11, "0", "1M")
        env.cli("replication", "enable", "app", "--replica-server", RBROKER, "--replica-port",
                str(proxy.port), "--auth", "certificate", host=A)  # fmt: skip
        env.cli("replication", "start-initial", "app", "--wait", host=A)
        vm_id = env.json("vm", "get", "app", host=A)[0]["id"]
        # Initial placement: the node the name led to owns the replica; A owns the primary.
        assert owned(c, R1) == [vm_id] and owned(c, R2) == owned(c, R3) == []
        assert env.owners() == {A: [vm_id], B: []}
        env.write(A, 0x12, "1M")
        env.synced(A)

        # The primary VM moves A -> B while the guest writes and cycles run.
        env.write(A, 0x21, "2M")
        load = Load(env)
        writer = threading.Thread(target=load.run, daemon=True)
        writer.start()
        wait_for(lambda: load.cycles[A] >= 1, WAIT, "a cycle on A under load")
        env.move(B, A)
        wait_for(lambda: load.cycles[B] >= 2 or not writer.is_alive(), WAIT, "cycles on B")
        load.stop.set()
        writer.join(WAIT)
        assert not writer.is_alive() and load.cycles[B] >= 1, load.cycles
        assert env.vms(A) == [] and env.vms(B) == ["app"]
        assert env.owners() == {A: [], B: [vm_id]}
        env.write(B, 0x22, "3M")
        env.synced(B)  # a delta, verified, equal: the move cost no resync

        # The replica node owning the replica VM dies (kill -9); another takes it over from the
        # shared storage once its lease expired, and the name moves to a node still up.
        env.write(B, 0x31, "4M")
        env.synced(B)
        c.kill(R1)
        proxy.target = c.hosts[R2].replica_port
        wait_for(lambda: owned(c, R2) + owned(c, R3) == [vm_id], WAIT, "the takeover")
        new = R2 if owned(c, R2) else R3
        # The name now leads to the survivor that does not own it: it redirects the primary.
        proxy.target = c.hosts[R3 if new == R2 else R2].replica_port
        env.replica = new
        wait_for(
            lambda: env.json("replication", "get", "app", host=new) != [],
            WAIT, f"{new} holding the relationship",
        )  # fmt: skip
        env.write(B, 0x32, "5M")
        env.synced(B)
        env.write(B, 0x33, "6M")
        env.synced(B)
        assert "replica-taken-over" in env.kinds(new)

        # Every record written before each step is on the disk (and so, equal, in the replica).
        assert env.reads(B, 0x11, "0", "1M")
        for pattern, offset in [(0x12, "1M"), (0x21, "2M"), (0x22, "3M"),
                                (0x31, "4M"), (0x32, "5M"), (0x33, "6M"), *load.records]:  # fmt: skip
            assert env.reads(B, pattern, offset), (hex(pattern), offset)
        env.no_resync(A, B, R2, R3)
        # Nothing changed on the replica cluster's entry: it names the primary cluster's broker.
        entries = env.json("auth", "get", host=new)
        assert [e["allowed_primary_server"] for e in entries] == [PBROKER], entries
        print(f"cycles under load: {load.cycles}, records {len(load.records)}")
    finally:
        proxy.close()
