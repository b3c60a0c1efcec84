"""The data path's redirect (transport/redirect.py): a primary replicates to the cluster's name,
the name moves to a node that does not own the VM, and that node sends the primary to the owner.

The cluster's name is a TCP proxy standing in for a floating address (or DNS round-robin): on
loopback every node listens on 127.0.0.1 with a port of its own, so "the name moves" is the
proxy switching its target. Both replica nodes' certificates carry the name `broker.test`.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import tomli_w

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import Proxy, owned, replicate_app, serve_replica_cluster
from tests.integration.replication_env import PRIMARY, REPLICA, verified_equal, wait_for
from tests.localcluster import Cluster
from vmreplica._internal import certs

BROKER = "broker.test"
OTHER = "vmhost3"


def test_a_primary_sent_to_a_node_that_does_not_own_the_vm_follows_the_redirect(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    c = stopped_cluster
    primary = tomllib.loads(c.hosts[PRIMARY].config.read_text())
    primary["resolve"][BROKER] = "127.0.0.1"
    c.hosts[PRIMARY].config.write_text(tomli_w.dumps(primary))
    member = ("--name", "r", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", "3")
    c.cli("cluster", "init", "--config", str(c.hosts[REPLICA].config), *member)
    c.cli("cluster", "join", "--config", str(c.hosts[OTHER].config), *member)

    # The broker's name: recorded once, each node's certificate issued for it.
    config1, config3 = str(c.hosts[REPLICA].config), str(c.hosts[OTHER].config)
    warned = c.cli("cluster", "broker", "add", "--config", config3, "--name", BROKER)
    assert f"does not carry {BROKER}" in warned.stderr
    other = c.cli("cluster", "broker", "add", "--config", config3, "--name", "b2.test", check=False)
    assert other.returncode == 4 and f"already has the broker name {BROKER}" in other.stderr
    for config in (config1, config3):
        info = c.cli_json("cluster", "broker", "add", "--config", config, "--name", BROKER,
                          "--ca", str(c.ca_dir), "-o", "json")[0]  # fmt: skip
        assert info["broker"] == BROKER
        assert BROKER in certs.cert_dns_names(Path(config).parent / "tls" / "cert.pem")
    c.start_all()

    port1, port3, storage = serve_replica_cluster(c, REPLICA, OTHER)

    proxy = Proxy(port1)
    try:
        pair = replicate_app(c, BROKER, proxy.port, storage)

        # The name moves to the node that does not own the VM: one redirect, then the owner.
        proxy.target = port3
        pair.write("app", 0, 0x22, "2M", "256k")
        before = proxy.connections
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        assert proxy.connections == before + 1
        assert c.cli_json("vm", "list", "-o", "json", host=OTHER) == []

        # Remembered: the next cycles go to the owner straight away.
        pair.write("app", 0, 0x33, "3M", "256k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        assert proxy.connections == before + 1

        # The owner dies (kill -9): the other node takes the VM over from the shared storage
        # once the lease expired, and the name, which leads to it, serves the primary again.
        vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
        agent = c.hosts[REPLICA].process
        assert agent is not None
        agent.kill()
        agent.wait()
        c.hosts[REPLICA].process = None
        killed = time.monotonic()
        wait_for(lambda: owned(c, OTHER) == [vm_id], 20, "the takeover")
        took = time.monotonic() - killed
        assert took < 3 + 3 / 4 + 2, took
        pair.write("app", 0, 0x44, "4M", "256k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        taken = pair.replication("app", OTHER)
        assert taken["state"] == "Replicating" and taken["mode"] == "Replica"
        events = [e["kind"] for e in c.cli_json("event", "list", "-o", "json", host=OTHER)]
        assert "replica-taken-over" in events

        # The former owner comes back with its old rows: it does not own the VM, so it sends
        # a primary to the owner and refuses to fail over. When the owner dies in turn, it
        # takes the VM back with the shared storage's facts, not its own older ones.
        c.start(REPLICA)
        refused = c.cli("failover", "start", "app", "--force", host=REPLICA, check=False)
        assert refused.returncode == 4 and "refusing to fail over" in refused.stderr, refused
        proxy.target = port1
        pair.write("app", 0, 0x55, "5M", "256k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        agent = c.hosts[OTHER].process
        assert agent is not None
        agent.kill()
        agent.wait()
        c.hosts[OTHER].process = None
        wait_for(lambda: owned(c, REPLICA) == [vm_id], 20, "the takeover back")
        pair.write("app", 0, 0x66, "6M", "256k")
        c.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)

        # An unplanned failover in the replica cluster: on the owning node, which runs the VM.
        c.cli("failover", "start", "app", "--force", host=REPLICA)
        c.cli("vm", "start", "app", host=REPLICA)
        assert c.cli_json("vm", "get", "app", "-o", "json", host=REPLICA)[0]["state"] == "Running"
        c.cli("vm", "stop", "app", "--force", host=REPLICA)
    finally:
        proxy.close()
