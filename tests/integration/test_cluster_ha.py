"""High availability in a replica cluster (engine/replica/ha.py), with real agents, a real
3-member etcd and real QEMU: a delta its owner applied but never answered is applied once, and
a failed-over replica VM that runs is started again by the node that takes it over when its
node dies, never twice at once.

A node's death is its agent killed with -9 and the QEMU processes it ran killed with it (a host
that loses power). The broker's name is the TCP proxy of test_cluster_redirect.py.
`VMR_HA_ROUNDS=N` repeats the node death N times and prints the HA time (the kill until the VM
runs again on the other node): median and maximum, with the lease TTL (`VMR_HA_TTL`, 3 s
by default).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomli_w

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import Proxy, owned, replicate_app, serve_replica_cluster
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    same_content,
    verified_equal,
    wait_for,
)
from tests.integration.test_cluster_redirect import BROKER, OTHER
from tests.localcluster import Cluster, qemu_pids_under
from vmreplica._internal.engine.replica.ha import RUNS_FILE
from vmreplica._internal.engine.replica.handoff import FILE, STEP_FILE

TTL = int(os.environ.get("VMR_HA_TTL", "3"))  # the lease TTL of the nodes


@contextmanager
def broker_cluster(
    c: Cluster,
    etcd: EtcdCluster,
    faults: str = "",
    primary_accepts: bool = False,
    enable: tuple[str, ...] = (),
    other_faults: str = "",
) -> Iterator[tuple[Pair, Proxy]]:
    """Two replica nodes (REPLICA, OTHER) of cluster "r" sharing one storage, the broker name
    BROKER in front of them, and VM "app" on PRIMARY replicating to it, owned by REPLICA
    (started with the fault points `faults`). With `primary_accepts`, PRIMARY accepts the
    cluster (its broker name) as a primary: replication can be reversed. `enable`: more
    `replication enable` options; `other_faults`: OTHER's fault points."""
    primary = tomllib.loads(c.hosts[PRIMARY].config.read_text())
    primary["resolve"][BROKER] = "127.0.0.1"
    c.hosts[PRIMARY].config.write_text(tomli_w.dumps(primary))
    member = ("--name", "r", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", str(TTL))
    c.cli("cluster", "init", "--config", str(c.hosts[REPLICA].config), *member)
    c.cli("cluster", "join", "--config", str(c.hosts[OTHER].config), *member)
    for node in (REPLICA, OTHER):
        c.cli("cluster", "broker", "add", "--config", str(c.hosts[node].config), "--name", BROKER,
              "--ca", str(c.ca_dir))  # fmt: skip
    node_faults = {REPLICA: faults, OTHER: other_faults}
    for node in c.hosts:
        env = {"VMREPLICA_FAULTS": node_faults[node]} if node in node_faults else None
        c.start(node, extra_env=env)
    port1, port3, storage = serve_replica_cluster(c, REPLICA, OTHER)
    if primary_accepts:
        c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
              str(c.hosts[PRIMARY].replica_port), host=PRIMARY)  # fmt: skip
        c.cli("auth", "new", "--allowed-primary", BROKER, "--storage-location",
              str(c.base / "primary-replicas"), "--trust-group", "Production", host=PRIMARY)  # fmt: skip
    proxy = Proxy(port1)
    try:
        pair = replicate_app(c, BROKER, proxy.port, storage, *enable)
        # From now on the name leads to OTHER: redirected to the owner while it lives.
        proxy.target = port3
        yield pair, proxy
    finally:
        proxy.close()


def kill_node(c: Cluster, node: str) -> None:
    """A node dies: its agent (-9) and the QEMU processes it ran."""
    agent = c.hosts[node].process
    assert agent is not None
    agent.kill()
    agent.wait()
    c.hosts[node].process = None
    for pid in qemu_pids_under(c.hosts[node].state_dir):
        os.kill(pid, signal.SIGKILL)


def applied(c: Cluster, node: str) -> tuple[int, list[int]]:
    """The sequence of node's replica of "app", and the sequences its cycles recorded (read
    from its database: the API shows neither)."""
    db = sqlite3.connect(f"file:{c.hosts[node].state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT sequence FROM replications WHERE vm_name = 'app'").fetchone()
        cycles = [s for (s,) in db.execute("SELECT sequence FROM cycles ORDER BY id")]
    finally:
        db.close()
    return (-1 if row is None else int(row[0])), cycles


def running(c: Cluster, node: str) -> bool:
    return bool(c.cli_json("vm", "get", "app", "-o", "json", host=node)[0]["state"] == "Running")


def test_a_delta_its_dead_owner_applied_is_applied_once_by_the_next(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    c = stopped_cluster
    with broker_cluster(c, etcd, "replica.after_apply_record=kill") as (pair, _):
        vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
        before, _ = applied(c, REPLICA)
        assert owned(c, REPLICA) == [vm_id]
        # The owner dies right after it recorded the apply, before its answer and the facts.
        pair.write("app", 0, 0x22, "2M", "256k")
        failed = c.cli("replication", "sync", "app", host=PRIMARY, check=False)
        assert failed.returncode != 0
        agent = c.hosts[REPLICA].process
        assert agent is not None and agent.wait(30) == -signal.SIGKILL
        c.hosts[REPLICA].process = None
        storage = pair.storage / "app"
        assert json.loads((storage / STEP_FILE).read_text())["sequence"] == before + 1
        assert json.loads((storage / FILE).read_text())["replication"]["sequence"] == before

        # OTHER takes the VM over and finishes that apply: the primary does not send it again.
        wait_for(lambda: owned(c, OTHER) == [vm_id], 20, "the takeover")
        wait_for(lambda: applied(c, OTHER)[0] == before + 1, 20, "the apply finished there")
        kinds = [e["kind"] for e in c.cli_json("event", "list", "-o", "json", host=OTHER)]
        assert "replica-apply-finished" in kinds
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        # Each sequence applied once, none lost (a sync also cuts a delta of its own).
        sequence, cycles = applied(c, OTHER)
        assert cycles == list(range(before + 1, sequence + 1)), (before, cycles)
        pair.write("app", 0, 0x33, "3M", "256k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        later, cycles = applied(c, OTHER)
        assert later > sequence and cycles == list(range(before + 1, later + 1)), cycles


def test_a_failed_over_vm_runs_again_on_the_node_that_takes_it_over(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    c = stopped_cluster
    rounds = int(os.environ.get("VMR_HA_ROUNDS", "1"))
    with broker_cluster(c, etcd) as (pair, _):
        vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
        storage = pair.storage / "app"
        c.cli("vm", "stop", "app", "--force", host=PRIMARY)
        c.cli("failover", "start", "app", "--force", host=REPLICA)
        c.cli("vm", "start", "app", host=REPLICA)
        assert (storage / RUNS_FILE).exists()
        assert len(qemu_pids_under(storage)) == 1

        # Never two QEMUs on the VM's images, whatever happens: sampled all along.
        most = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                most[0] = max(most[0], len(qemu_pids_under(storage)))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        times = []
        owner, other = REPLICA, OTHER
        try:
            for _ in range(rounds):
                kill_node(c, owner)
                killed = time.monotonic()
                wait_for(lambda o=other: owned(c, o) == [vm_id], 30, "the takeover")  # type: ignore[misc]
                wait_for(lambda o=other: running(c, o), 60, "the VM running again")  # type: ignore[misc]
                times.append(time.monotonic() - killed)
                assert len(qemu_pids_under(storage)) == 1
                c.start(owner)  # the dead node comes back: it neither runs nor stops the VM
                time.sleep(TTL)
                assert running(c, other) and not running(c, owner)
                owner, other = other, owner
        finally:
            done.set()
            sampler.join()
        assert most[0] == 1, most
        print(f"\nHA time, lease TTL {TTL} s, {rounds} round(s): median "
              f"{statistics.median(times):.2f} s, max {max(times):.2f} s: {[round(t, 2) for t in times]}")  # fmt: skip
        assert max(times) < TTL + 30, times

        # A fenced owner (its agent paused past the lease) kills the VM; the next owner,
        # which the image lock kept from starting it meanwhile, starts it.
        agent = c.hosts[owner].process
        assert agent is not None
        agent.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: owned(c, other) == [vm_id], 30, "the takeover of a paused owner")
            time.sleep(2)
            assert len(qemu_pids_under(storage)) == 1  # still the paused owner's
        finally:
            agent.send_signal(signal.SIGCONT)
        wait_for(lambda: running(c, other), 60, "the VM running on the new owner")
        assert len(qemu_pids_under(storage)) == 1
        kinds = [e["kind"] for e in c.cli_json("event", "list", "-o", "json", host=owner)]
        assert "cluster-fenced-vm-stopped" in kinds
        assert not running(c, owner)

        # Stopped by the operator: it is no longer to run anywhere.
        c.cli("vm", "stop", "app", "--force", host=other)
        assert not (storage / RUNS_FILE).exists()


def reads(c: Cluster, host: str, pattern: int, offset: str, length: str) -> bool:
    out = c.cli(
        "vm", "monitor", "app", f'qemu-io disk0 "read -P {pattern:#x} {offset} {length}"', host=host
    ).stdout
    return "Pattern verification failed" not in out and "read " in out


def test_reverse_and_failback_through_the_broker_name(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """Planned failover to the cluster, reverse (the owner replicates back to PRIMARY), then
    fail back with the reverse sent to the broker's name, which leads to the node that does
    not own the VM: redirected to the owner, and the cycles after it too."""
    c = stopped_cluster
    with broker_cluster(c, etcd, primary_accepts=True) as (pair, proxy):
        pair.write("app", 0, 0x22, "2M", "1M")
        c.cli("vm", "stop", "app", "--force", host=PRIMARY)
        c.cli("failover", "start", "app", "--prepare", host=PRIMARY)
        refused = c.cli("failover", "start", "app", host=OTHER, check=False)
        assert refused.returncode != 0
        c.cli("failover", "start", "app", host=REPLICA)
        c.cli("replication", "set", "app", "--reverse", host=REPLICA)
        assert pair.replication("app", REPLICA)["mode"] == "Primary"
        assert pair.replication("app", PRIMARY)["mode"] == "Replica"
        facts = json.loads((pair.storage / "app" / FILE).read_text())
        assert facts["replication"]["mode"] == "Primary"  # the facts follow the reverse

        c.cli("vm", "start", "app", host=REPLICA)
        assert reads(c, REPLICA, 0x11, "0", "1M") and reads(c, REPLICA, 0x22, "2M", "1M")
        pair.write("app", 0, 0x33, "3M", "512k", host=REPLICA)
        c.cli("replication", "sync", "app", host=REPLICA)

        # Fail back: the reverse goes to the broker's name, which leads to OTHER.
        assert proxy.target == c.hosts[OTHER].replica_port
        c.cli("vm", "stop", "app", "--force", host=REPLICA)
        c.cli("failover", "start", "app", "--prepare", host=REPLICA)
        c.cli("failover", "start", "app", host=PRIMARY)
        c.stop(PRIMARY)  # it forgets the owner it remembered: the reverse asks the name
        c.start(PRIMARY)
        before = proxy.connections
        c.cli("replication", "set", "app", "--reverse", "--replica-server", BROKER,
              "--replica-port", str(proxy.port), host=PRIMARY)  # fmt: skip
        assert proxy.connections > before
        assert pair.replication("app", PRIMARY)["mode"] == "Primary"
        back = pair.replication("app", REPLICA)
        assert back["mode"] == "Replica" and back["state"] == "Replicating", back
        assert c.cli_json("vm", "list", "-o", "json", host=OTHER) == []
        c.cli("vm", "start", "app", host=PRIMARY)
        for pattern, offset, length in (
            (0x11, "0", "1M"),
            (0x22, "2M", "1M"),
            (0x33, "3M", "512k"),
        ):
            assert reads(c, PRIMARY, pattern, offset, length)
        pair.write("app", 0, 0x44, "5M", "64k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        tip = Path(str(c.cli_json("vm", "get", "app", "-o", "json", host=REPLICA)[0]["disks"][0]))
        c.cli("vm", "monitor", "app", 'qemu-io disk0 "flush"', host=PRIMARY)
        assert same_content(pair.primary_disk("app", 0), tip)
        # The facts lie beside the chains' new directory: a takeover finds them.
        facts = json.loads((tip.parent.parent / FILE).read_text())
        assert facts["replication"]["mode"] == "Replica"
