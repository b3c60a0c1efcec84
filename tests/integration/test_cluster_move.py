"""`vm move`: the primary side of a cluster (docs/CLUSTER.md).

vmhost2 and vmhost3 are the nodes of the primary cluster `p` (a real 3-member etcd); their
VM's disk lies in a directory both use (the shared storage). vmhost1, on its own, is the replica
server, and its one authorization entry names the primary cluster's broker `pbroker.test`, which
both primary nodes' certificates carry: whichever node owns the VM replicates it, before and
after a move, without any change on the replica.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import (
    TIMEOUT,
    Env,
    Proxy,
    owned,
    replicate_app,
    serve_replica_cluster,
)
from tests.integration.replication_env import died_by_sigkill, verified_equal, wait_for
from tests.localcluster import Cluster
from vmreplica._internal import certs

REPLICA, A, B = "vmhost1", "vmhost2", "vmhost3"
BROKER = "pbroker.test"
RBROKER = "rbroker.test"


def primary_cluster(c: Cluster, etcd: EtcdCluster) -> Env:
    member = ("--name", "p", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", "3")
    c.cli("cluster", "init", "--config", str(c.hosts[A].config), *member)
    c.cli("cluster", "join", "--config", str(c.hosts[B].config), *member)
    for node in (A, B):
        config = str(c.hosts[node].config)
        c.cli("cluster", "broker", "add", "--config", config, "--name", BROKER, "--ca",
              str(c.ca_dir))  # fmt: skip
        assert BROKER in certs.cert_dns_names(Path(config).parent / "tls" / "cert.pem")
    c.start_all()
    port = c.hosts[REPLICA].replica_port
    c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
          str(port), host=REPLICA)  # fmt: skip
    storage = c.base / "replica-storage"
    # The entry names the primary cluster's broker, not its nodes.
    c.cli("auth", "new", "--allowed-primary", BROKER, "--storage-location", str(storage),
          "--trust-group", "Production", host=REPLICA)  # fmt: skip
    shared = c.base / "primary-shared"
    shared.mkdir()
    disk = shared / "app.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    env = Env(c, storage, disk, REPLICA, (A, B))
    env.cli("vm", "new", "app", "--disk-path", str(disk), host=A)
    env.cli("vm", "start", "app", host=A)
    env.write(A, 0x11, "0", "1M")
    env.cli("replication", "enable", "app", "--replica-server", REPLICA, "--replica-port",
            str(port), "--auth", "certificate", host=A)  # fmt: skip
    env.cli("replication", "start-initial", "app", "--wait", host=A)
    env.synced(A)
    return env


def test_a_running_primary_vm_moves_between_nodes_and_replication_continues_with_a_delta(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    env = primary_cluster(stopped_cluster, etcd)
    vm_id = env.json("vm", "get", "app", host=A)[0]["id"]
    assert env.owners() == {A: [vm_id], B: []}  # owned since `replication enable`

    # A guest that ignores the ACPI request (this one has no OS) keeps running where it is.
    stuck = env.cli("vm", "move", "app", "--to", B, "--timeout", "2", host=A, check=False)
    assert stuck.returncode == 4 and "did not power off within 2 s" in stuck.stderr, stuck
    assert env.json("vm", "get", "app", host=A)[0]["state"] == "Running"
    assert env.vms(B) == []
    # A VM whose replication is not Replicating is busy: refused, nothing changes.
    env.cli("replication", "suspend", "app", host=A)
    busy = env.cli("vm", "move", "app", "--to", B, "--force", host=A, check=False)
    assert busy.returncode == 4 and "is busy" in busy.stderr, busy
    assert env.json("vm", "get", "app", host=A)[0]["state"] == "Running"
    env.cli("replication", "resume", "app", host=A)

    times = []
    here, there, pattern = A, B, 0x20
    for run in range(3):
        started = time.monotonic()
        out = env.move(there, here)
        times.append(time.monotonic() - started)
        assert env.vms(here) == [] and env.vms(there) == ["app"]
        assert env.json("vm", "get", "app", host=there)[0]["state"] == "Running"
        assert env.owners().get(there) == [vm_id]
        # The guest's data came along, and the next cycle is a delta the replica verifies.
        assert env.reads(there, 0x11, "0", "1M")
        env.write(there, pattern + run, f"{2 + run}M")
        env.synced(there)
        assert env.reads(there, pattern + run, f"{2 + run}M")
        print(f"move {here} -> {there}: {out['seconds']:.2f} s in the agent "
              f"({out['handover_seconds']:.2f} s to the handover), {times[-1]:.2f} s CLI")  # fmt: skip
        here, there = there, here
    env.no_resync()
    # Nothing changed on the replica: its one entry names the broker, not a node.
    entries = env.json("auth", "get", host=REPLICA)
    assert [e["allowed_primary_server"] for e in entries] == [BROKER], entries
    print(f"vm move: median {statistics.median(times):.2f} s, max {max(times):.2f} s")

    # Only the owner runs it: the former node has no VM, and the move refuses bad input.
    unknown = env.cli("vm", "move", "app", "--to", "nosuch", host=here, check=False)
    assert unknown.returncode != 0 and "no live node nosuch" in unknown.stderr, unknown
    assert len(unknown.stderr.strip().splitlines()) <= 2, unknown.stderr
    same = env.cli("vm", "move", "app", "--to", here, host=here, check=False)
    assert same.returncode != 0 and "already" in same.stderr, same
    missing = env.cli("vm", "move", "app", "--to", here, host=there, check=False)
    assert missing.returncode != 0 and "no VM named 'app'" in missing.stderr, missing
    alone = env.cli("vm", "move", "app", "--to", A, host=REPLICA, check=False)
    assert alone.returncode != 0 and "not a node of a cluster" in alone.stderr, alone
    assert env.json("vm", "get", "app", host=here)[0]["state"] == "Running"
    # A node that is down (it left: its lease is revoked) is not a target.
    env.c.stop(there)
    wait_for(lambda: there not in env.owners(), 30, f"{there} gone")
    down = env.cli("vm", "move", "app", "--to", there, "--force", host=here, check=False)
    assert down.returncode != 0 and f"no live node {there}" in down.stderr, down
    assert env.json("vm", "get", "app", host=here)[0]["state"] == "Running"


def restart_when_gone(env: Env, host: str, faults: str = "") -> None:
    """A node killed with -9: its lease expires (TTL 3 s), then its agent starts again."""
    wait_for(lambda: host not in env.owners(), 30, f"{host}'s lease to expire")
    env.c.start(host, extra_env={"VMREPLICA_FAULTS": faults} if faults else None)


def test_a_move_killed_at_each_point_ends_with_the_vm_running_on_exactly_one_node(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    env = primary_cluster(stopped_cluster, etcd)
    c = env.c

    # A failure after the facts were written: rolled back at once, A runs the VM again.
    c.stop(A)
    c.start(A, extra_env={"VMREPLICA_FAULTS": "vm.move.after_export=error"})
    failed = env.cli("vm", "move", "app", "--to", B, "--force", host=A, check=False)
    assert failed.returncode != 0 and "injected fault" in failed.stderr, failed
    assert env.json("vm", "get", "app", host=A)[0]["state"] == "Running"
    assert env.vms(B) == [] and not list(env.disk.parent.glob(".vmreplica-*.json"))
    env.write(A, 0x30, "1M")
    env.synced(A)

    # Killed after the facts were written, before the handover: rolled back, A runs the VM.
    c.stop(A)
    c.start(A, extra_env={"VMREPLICA_FAULTS": "vm.move.after_export=kill"})
    cut = env.cli("vm", "move", "app", "--to", B, "--force", host=A, check=False)
    assert cut.returncode != 0
    died_by_sigkill(c, A)
    restart_when_gone(env, A)
    wait_for(lambda: env.json("vm", "get", "app", host=A)[0]["state"] == "Running", 60,
             "the VM running again on A")  # fmt: skip
    assert env.vms(B) == []
    assert "vm-move-rolled-back" in env.kinds(A)
    assert not list(env.disk.parent.glob(".vmreplica-*.json"))
    env.write(A, 0x31, "2M")
    env.synced(A)

    # Killed right after the handover: B attaches and runs the VM, A forgets it at its start.
    c.stop(A)
    c.start(A, extra_env={"VMREPLICA_FAULTS": "vm.move.after_handover=kill"})
    cut = env.cli("vm", "move", "app", "--to", B, "--force", host=A, check=False)
    assert cut.returncode != 0
    died_by_sigkill(c, A)
    wait_for(lambda: env.vms(B) == ["app"], 60, "B attaching the VM")
    wait_for(lambda: env.json("vm", "get", "app", host=B)[0]["state"] == "Running", 60,
             "the VM running on B")  # fmt: skip
    restart_when_gone(env, A)
    assert env.vms(A) == []
    assert "vm-moved" in env.kinds(A) and "vm-attached" in env.kinds(B)
    assert env.reads(B, 0x31, "2M")
    env.write(B, 0x32, "3M")
    env.synced(B)
    env.no_resync()


def test_a_cycle_requested_during_a_move_is_refused_and_the_move_completes(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """Only the move's own last cycle runs while the VM moves: a `replication sync` then is
    refused as busy (a delta cut after the last one would stay in the source's pending log,
    which the move forgets, and move the tracking generation behind the facts B takes)."""
    env = primary_cluster(stopped_cluster, etcd)
    c = env.c
    # Each cycle holds its cycle lock 4 s after the cut: the sync below reaches A in the move.
    c.stop(A)
    c.start(A, extra_env={"VMREPLICA_FAULTS": "primary.after_cut=sleep:4"})
    env.write(A, 0x40, "1M")
    moved: list[Any] = []
    mover = threading.Thread(target=lambda: moved.append(env.move(B, A)), daemon=True)
    mover.start()
    wait_for(lambda: "vm-move-started" in env.kinds(A), 60, "the move to begin")
    busy = env.cli("replication", "sync", "app", host=A, check=False)
    assert busy.returncode == 4 and "a move of it is in progress" in busy.stderr, busy
    mover.join(TIMEOUT)
    assert moved and moved[0]["state"] == "Running", moved
    assert env.vms(A) == [] and env.vms(B) == ["app"]
    # The refusal was no failure of the replication; the next cycle, on B, is a delta.
    assert env.reads(B, 0x40, "1M")
    env.write(B, 0x41, "2M")
    env.synced(B)
    env.no_resync()


def test_a_replica_vm_moves_between_the_nodes_of_a_replica_cluster(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """The relationship moves; the primary, replicating to the replica cluster's broker name,
    is redirected to the new owner, which applies the next delta."""
    c = stopped_cluster
    primary = tomllib.loads(c.hosts[A].config.read_text())
    primary["resolve"][RBROKER] = "127.0.0.1"
    c.hosts[A].config.write_text(tomli_w.dumps(primary))
    member = ("--name", "r", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", "3")
    c.cli("cluster", "init", "--config", str(c.hosts[REPLICA].config), *member)
    c.cli("cluster", "join", "--config", str(c.hosts[B].config), *member)
    for node in (REPLICA, B):
        c.cli("cluster", "broker", "add", "--config", str(c.hosts[node].config), "--name",
              RBROKER, "--ca", str(c.ca_dir))  # fmt: skip
    c.start_all()
    port1, _, storage = serve_replica_cluster(c, REPLICA, B)  # A is replication_env's PRIMARY
    proxy = Proxy(port1)
    try:
        pair = replicate_app(c, RBROKER, proxy.port, storage)
        vm_id = str(c.cli_json("vm", "get", "app", host=A)[0]["id"])

        out = c.cli_json("vm", "move", "app", "--to", B, host=REPLICA)[0]
        assert out["target"] == B and out["state"] == "HandedOver", out
        wait_for(lambda: owned(c, B) == [vm_id], 30, "B owning the replica")
        wait_for(lambda: bool(c.cli_json("replication", "get", "-o", "json", host=B)), 30,
                 "B holding the relationship")  # fmt: skip

        # The name still leads to the source, which redirects the primary to B.
        pair.write("app", 0, 0x22, "2M", "256k")
        c.cli("replication", "sync", "app", host=A)
        verified_equal(pair)
        events = {e["kind"] for e in c.cli_json("event", "list", "-o", "json", host=B)}
        assert "replica-taken-over" in events
        assert not {k for k in events if "resync" in k}
    finally:
        proxy.close()
