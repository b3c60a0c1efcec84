"""The broker's cost on one cycle: `replication sync` of a VM replicating to the cluster's name
versus one replicating straight to the owning node, in the same run.

Run: ``.venv/bin/python bench/bench_cluster_cycle.py [--rounds 7] [--takeovers 10] [--ttl 10]``.

Second part, with real agents: kill -9 of the agent owning the replica of `broker`, 10 times,
alternating nodes (the killed agent is started again after each run): the time until the other
node owns the VM in etcd, and until a `replication sync` through the name succeeds (the proxy is
pointed at the survivor first, as a floating address would move).

Three agents on loopback: vmhost2 the primary, vmhost1 and vmhost3 nodes of a replica cluster on
a real 3-member etcd, with the broker name `broker.test` (each node's certificate issued for it
by `cluster broker add --ca`). The name is a counting TCP proxy standing in for a floating
address. Two VMs that are off, 256 MiB disks: `direct` replicates to vmhost1 by its own name and
port, `broker` to `broker.test` through the proxy. Both replicas land on vmhost1 (the node the
primary reached). Then the proxy is switched to vmhost3, which does not own `broker`: its first
cycle is redirected (one more STATUS, one more TLS connection), and the later ones go to the
remembered owner. Each cycle carries a 1 MiB write (qemu-io on the closed image); the timings
include the CLI's start-up, like the baseline `vm get`.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w
from benchlib import (
    CountingProxy,
    MiB,
    exit_cleanly_on_sigterm,
    qemu_io_write,
    table,
    timed,
)

from tests.etcd_cluster import EtcdCluster
from tests.localcluster import Cluster
from vmreplica._internal.cluster import member

PRIMARY, NODE1, NODE3 = "vmhost2", "vmhost1", "vmhost3"
BROKER = "broker.test"


def owner_of(etcd: EtcdCluster, vm_id: str) -> str | None:
    async def ask() -> str | None:
        client = etcd.client(timeout=1)
        try:
            return (await member.owners(client, "bench")).get(vm_id)
        finally:
            await client.close()

    return asyncio.run(ask())


def kill_owners(c: Cluster, etcd: EtcdCluster, disk: Path, runs: int) -> list[tuple[float, float]]:
    """kill -9 the agent owning `broker`, time the other node's takeover and the first cycle
    that succeeds through the name (the proxy pointed at the survivor: the floating address
    moved), then start the killed agent again for the next run."""
    vm_id = str(c.cli_json("vm", "get", "broker", host=PRIMARY)[0]["id"])
    out = []
    for n in range(runs):
        owner = owner_of(etcd, vm_id)
        assert owner in (NODE1, NODE3), owner
        other = NODE3 if owner == NODE1 else NODE1
        PROXY[0].target_port = c.hosts[other].replica_port
        qemu_io_write(disk, [(100 * MiB + n * MiB, MiB, 0x80 + n)])
        process = c.hosts[owner].process
        assert process is not None
        start = time.monotonic()
        process.kill()
        process.wait()
        c.hosts[owner].process = None
        while owner_of(etcd, vm_id) != other:
            time.sleep(0.05)
        owned = time.monotonic() - start
        while c.cli("replication", "sync", "broker", host=PRIMARY, check=False).returncode:
            time.sleep(0.2)
        out.append((owned, time.monotonic() - start))
        print(f"takeover {n + 1}: owned {owned:.2f} s, cycle done {out[-1][1]:.2f} s", flush=True)
        c.start(owner)
    return out


PROXY: list[CountingProxy] = []


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--takeovers", type=int, default=10)
    parser.add_argument("--ttl", type=int, default=10, help="the nodes' lease TTL")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    base = Path(tempfile.mkdtemp(prefix="rbench-cluster-", dir="/tmp"))
    etcd = EtcdCluster.create(prefix="rbench-etcd-")
    c = Cluster.create(names=(NODE1, PRIMARY, NODE3), base=base)
    try:
        etcd.start()
        etcd.wait_healthy()
        primary = tomllib.loads(c.hosts[PRIMARY].config.read_text())
        primary["resolve"][BROKER] = "127.0.0.1"
        c.hosts[PRIMARY].config.write_text(tomli_w.dumps(primary))
        member = ("--name", "bench", "--etcd", etcd.endpoints_arg, *etcd.tls_args,
                  "--lease-ttl", str(args.ttl))  # fmt: skip
        c.cli("cluster", "init", "--config", str(c.hosts[NODE1].config), *member)
        c.cli("cluster", "join", "--config", str(c.hosts[NODE3].config), *member)
        for node in (NODE1, NODE3):
            c.cli("cluster", "broker", "add", "--config", str(c.hosts[node].config),
                  "--name", BROKER, "--ca", str(c.ca_dir))  # fmt: skip
        c.start_all()
        port1, port3 = c.hosts[NODE1].replica_port, c.hosts[NODE3].replica_port
        c.cli("server", "set", "--certificate-port", str(port3), host=NODE3)
        c.cli("server", "set", "--enabled", "true", "--auth", "certificate",
              "--certificate-port", str(port1), host=NODE1)  # fmt: skip
        c.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
              str(base / "shared"), "--trust-group", "Bench", host=NODE1)  # fmt: skip
        with CountingProxy(port1) as proxy:
            PROXY.append(proxy)
            disks = {}
            for vm, server, port in (("direct", NODE1, port1), ("broker", BROKER, proxy.port)):
                c.cli("vm", "new", vm, "--disk", "256M", host=PRIMARY)
                disks[vm] = Path(str(c.cli_json("vm", "get", vm, host=PRIMARY)[0]["disks"][0]))
                c.cli("replication", "enable", vm, "--replica-server", server, "--replica-port",
                      str(port), "--auth", "certificate", host=PRIMARY)  # fmt: skip
                c.cli("replication", "start-initial", vm, "--wait", host=PRIMARY, timeout=600)
            proxy.target_port = port3  # the name moved to the node that does not own `broker`

            def cycle(vm: str, n: int) -> float:
                qemu_io_write(disks[vm], [(n * MiB, MiB, 0x10 + n % 200)])
                return timed(lambda: c.cli("replication", "sync", vm, host=PRIMARY))

            redirected = cycle("broker", 1)
            times: dict[str, list[float]] = {"direct": [], "broker": []}
            noop: list[float] = []
            for n in range(2, 2 + args.rounds):
                for vm in ("direct", "broker"):
                    times[vm].append(cycle(vm, n))
                noop.append(timed(lambda: c.cli("vm", "get", "direct", host=PRIMARY)))
            takeovers = kill_owners(c, etcd, disks["broker"], args.takeovers)
        direct, broker = statistics.median(times["direct"]), statistics.median(times["broker"])
        print(f"\n{args.rounds} rounds, a 1 MiB delta per cycle, CLI start-up included")
        table(
            ["cycle", "median s", "vs direct"],
            [
                ["straight to the node (direct)", f"{direct:.3f}", "1.00"],
                ["to the broker name, owner remembered", f"{broker:.3f}", f"{broker / direct:.2f}"],
                [
                    "to the broker name, first after it moved (1 redirect; one sample)",
                    f"{redirected:.3f}",
                    f"{redirected / direct:.2f}",
                ],
                ["baseline: vm get (no-op CLI call)", f"{statistics.median(noop):.3f}", ""],
            ],
        )
        if takeovers:
            owned, synced = zip(*takeovers, strict=True)
            print(f"\nkill -9 of the agent owning `broker`, {len(takeovers)} runs, lease TTL "
                  f"{args.ttl} s: the other node owns it after median {statistics.median(owned):.2f} s "
                  f"(max {max(owned):.2f} s); a cycle through the name succeeded after median "
                  f"{statistics.median(synced):.2f} s (max {max(synced):.2f} s)")  # fmt: skip
    finally:
        c.close()
        etcd.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(etcd.base, ignore_errors=True)


if __name__ == "__main__":
    main()
