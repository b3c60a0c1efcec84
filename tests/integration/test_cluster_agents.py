"""Real agents as nodes of a cluster on a real 3-member etcd: the `cluster` commands, and the
fence on the replica's data path (docs/CLUSTER.md)."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time

import pytest

from tests.etcd_cluster import EtcdCluster
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    make_pair,
    replicated_vm,
    verified_equal,
    wait_for,
)
from tests.localcluster import Cluster
from vmreplica._internal import certs

TTL = "3"


def config(cluster: Cluster, host: str) -> str:
    return str(cluster.hosts[host].config)


def nodes(cluster: Cluster, host: str) -> dict[str, dict[str, object]]:
    rows = cluster.cli_json(
        "cluster", "node", "list", "--config", config(cluster, host), "-o", "json"
    )
    assert isinstance(rows, list)
    return {str(r["name"]): r for r in rows}


def refused_by_etcd(c: Cluster, etcd: EtcdCluster) -> None:
    """etcd runs with --client-cert-auth: no client certificate, or one of another CA, is
    refused in one line, and host.toml stays as it was."""
    host = config(c, REPLICA)
    before = c.hosts[REPLICA].config.read_text()
    init = ("cluster", "init", "--config", host, "--name", "r", "--etcd", etcd.endpoints_arg)
    other = c.base / "other-etcd-ca"
    certs.new_ca(other / "ca", "not the etcd CA")
    certs.issue(other / "ca", ["localhost"], other / "client")
    cases = [
        ((), 2, "https:// needs --etcd-ca, --etcd-cert and --etcd-key"),
        (("--etcd-ca", str(etcd.ca)), 2, "give --etcd-ca, --etcd-cert and --etcd-key together"),
        (("--etcd-ca", str(etcd.ca), "--etcd-cert", str(c.base / "nope.pem"), "--etcd-key",
          str(etcd.client_key)), 3, f"certificate not found: {c.base / 'nope.pem'}"),
        (("--etcd-ca", str(etcd.ca), "--etcd-cert", str(other / "client/cert.pem"),
          "--etcd-key", str(other / "client/key.pem")), 6, "TLS refused"),
    ]  # fmt: skip
    for args, code, message in cases:
        r = c.cli(*init, *args, check=False)
        assert r.returncode == code and r.stderr.count("\n") == 1, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    http = [u.replace("https://", "http://") for u in etcd.endpoints]
    r = c.cli(*init[:-1], ",".join(http), check=False)  # a TLS port answers no plain http
    assert r.returncode == 6 and r.stderr.count("\n") == 1, r.stderr
    assert c.hosts[REPLICA].config.read_text() == before


def test_cluster_commands(stopped_cluster: Cluster, etcd: EtcdCluster) -> None:
    c = stopped_cluster
    urls = etcd.endpoints_arg
    member = ("--etcd", urls, *etcd.tls_args, "--lease-ttl", TTL)

    bad = c.cli("cluster", "init", "--config", config(c, REPLICA), "--name", "r", "--etcd",
                "localhost:2379", check=False)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--etcd: 'localhost:2379' is not https://HOST:PORT" in bad.stderr
    refused_by_etcd(c, etcd)
    missing = c.cli("cluster", "join", "--config", config(c, "vmhost3"), "--name", "r", *member,
                    check=False)  # fmt: skip
    assert missing.returncode == 3 and "no cluster r in etcd" in missing.stderr
    assert "cluster" not in c.hosts["vmhost3"].config.read_text()

    info = c.cli_json("cluster", "init", "--config", config(c, REPLICA), "--name", "r", *member,
                      "-o", "json")[0]  # fmt: skip
    assert info["name"] == "r" and info["nodes"] == 0 and info["broker"] is None
    again = c.cli("cluster", "init", "--config", config(c, "vmhost3"), "--name", "r", *member,
                  check=False)  # fmt: skip
    assert again.returncode == 4 and "cluster r already exists" in again.stderr
    c.cli("cluster", "join", "--config", config(c, "vmhost3"), "--name", "r", *member)

    c.start(REPLICA)
    c.start("vmhost3")
    listed = nodes(c, REPLICA)
    assert set(listed) == {REPLICA, "vmhost3"}
    assert all(n["healthy"] and n["owned_vms"] == [] for n in listed.values())
    got = c.cli_json("cluster", "get", "--config", config(c, "vmhost3"), "-o", "json")[0]
    assert got["nodes"] == 2 and got["healthy_nodes"] == 2

    # Settings and authorization entries set on one node are the whole cluster's; the ports
    # stay each node's own (on loopback, two nodes cannot share one).
    port1, port3 = c.hosts[REPLICA].replica_port, c.hosts["vmhost3"].replica_port
    c.cli("server", "set", "--certificate-port", str(port3), host="vmhost3")
    storage = str(c.base / "shared-storage")
    c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
          str(port1), host=REPLICA)  # fmt: skip
    c.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location", storage,
          "--trust-group", "Production", host=REPLICA)  # fmt: skip

    def settings(host: str) -> tuple[object, ...]:
        got = c.cli_json("server", "get", "-o", "json", host=host)[0]
        entries = c.cli_json("auth", "get", "-o", "json", host=host)
        return (
            got["replication_enabled"], got["allowed_authentication_type"],
            got["certificate_authentication_port"],
            [(e["allowed_primary_server"], e["replica_storage_location"], e["trust_group"])
             for e in entries],
        )  # fmt: skip

    entry = [(PRIMARY, storage, "Production")]
    wait_for(lambda: settings("vmhost3") == (True, "certificate", port3, entry), 15,
             "the settings on the other node")  # fmt: skip
    c.cli("auth", "set", "--allowed-primary", PRIMARY, "--trust-group", "Test", host="vmhost3")
    wait_for(lambda: settings(REPLICA)[3] == [(PRIMARY, storage, "Test")], 15,
             "the change made on the other node")  # fmt: skip
    assert settings(REPLICA)[2] == port1

    # Leaving revokes the lease at once: the node is gone from the list.
    c.stop("vmhost3")
    assert set(nodes(c, REPLICA)) == {REPLICA}
    not_a_node = c.cli("cluster", "get", "--config", config(c, PRIMARY), check=False)
    assert not_a_node.returncode == 4 and "is in no cluster" in not_a_node.stderr

    # An agent whose client certificate etcd does not trust stops at start, in one line.
    toml = c.hosts["vmhost3"].config
    other = c.base / "other-etcd-ca" / "client"
    toml.write_text(toml.read_text().replace(str(etcd.client_cert), str(other / "cert.pem"))
                    .replace(str(etcd.client_key), str(other / "key.pem")))  # fmt: skip
    log = c.hosts["vmhost3"].log
    log.write_text("")
    with pytest.raises(RuntimeError, match="agent vmhost3 exited"):
        c.start("vmhost3")
    lines = log.read_text().splitlines()
    assert "Traceback" not in log.read_text(), lines
    assert lines[-1].startswith("vmreplica: etcd at https://") and "TLS refused" in lines[-1]


def test_replica_node_applies_only_under_a_valid_lease(cluster: Cluster, etcd: EtcdCluster) -> None:
    """The replica host is a node; etcd loses its quorum: the replica refuses deltas (the
    primary keeps them), nobody else takes the VM; quorum back: the next cycle applies them."""
    c = cluster
    c.cli("cluster", "init", "--config", config(c, REPLICA), "--name", "r", "--etcd",
          etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", TTL)  # fmt: skip
    c.stop(REPLICA)
    c.start(REPLICA)
    pair = make_pair(c)
    replicated_vm(pair)
    vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
    assert nodes(c, REPLICA)[REPLICA]["owned_vms"] == [vm_id]

    etcd.kill(etcd.members[0])
    pair.write("app", 0, 0x21, "2M", "256k")
    c.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)

    etcd.kill(etcd.members[1])

    def refused() -> bool:
        done = c.cli("replication", "sync", "app", host=PRIMARY, check=False)
        return done.returncode != 0 and "holds no valid cluster lease" in done.stderr

    wait_for(refused, 20, "the replica refusing deltas without a quorum")
    pair.write("app", 0, 0x22, "3M", "256k")
    assert refused()
    assert not pair.equal("app", 0)
    fenced = [e for e in pair.json("event", "list", host=REPLICA) if e["kind"] == "cluster-fenced"]
    assert len(fenced) == 1 and "lost its lease of cluster r" in str(fenced[0]["message"])

    etcd.start(etcd.members[0])
    etcd.start(etcd.members[1])
    etcd.wait_healthy()

    def applied() -> bool:
        return c.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode == 0

    wait_for(applied, 30, "deltas applied again")
    verified_equal(pair)
    assert nodes(c, REPLICA)[REPLICA]["owned_vms"] == [vm_id]

    # A restarted agent joins with a new lease and owns its replica again.
    c.stop(REPLICA)
    c.start(REPLICA)
    pair.write("app", 0, 0x23, "4M", "256k")
    c.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)

    # Paused past its lease (SIGSTOP): on SIGCONT the node finds its lease gone, fenced, joins
    # again with a new lease and takes back the VM nobody else can serve; cycles go on.
    agent = c.hosts[REPLICA].process
    assert agent is not None
    os.kill(agent.pid, signal.SIGSTOP)
    time.sleep(int(TTL) + 2)
    os.kill(agent.pid, signal.SIGCONT)
    pair.write("app", 0, 0x25, "6M", "256k")
    wait_for(applied, 30, "deltas applied after the pause")
    verified_equal(pair)
    assert nodes(c, REPLICA)[REPLICA]["owned_vms"] == [vm_id]

    # The delta waits while another process (a former owner) holds the VM's storage lock.
    fd = os.open(pair.storage / "app" / "cluster.lock", os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    pair.write("app", 0, 0x24, "5M", "256k")
    started = time.monotonic()
    threading.Timer(3, os.close, [fd]).start()  # closing releases the lock
    c.cli("replication", "sync", "app", host=PRIMARY)
    assert time.monotonic() - started >= 3
    verified_equal(pair)


def test_plain_http_etcd_works_with_a_warning(stopped_cluster: Cluster) -> None:
    """http:// is still accepted (clusters set up before TLS), and the agent says at start that
    etcd is unauthenticated."""
    c = stopped_cluster
    plain = EtcdCluster.create(tls=False)
    try:
        plain.start()
        plain.wait_healthy()
        c.cli("cluster", "init", "--config", config(c, REPLICA), "--name", "p", "--etcd",
              plain.endpoints_arg, "--lease-ttl", TTL)  # fmt: skip
        c.start(REPLICA)
        assert nodes(c, REPLICA)[REPLICA]["healthy"]
        events = c.cli_json("event", "list", "-o", "json", host=REPLICA)
        warned = [e for e in events if e["kind"] == "cluster-etcd-unauthenticated"]
        assert len(warned) == 1 and warned[0]["level"] == "warning", warned
        assert "without authentication" in str(warned[0]["message"])
        assert "cluster-etcd-unauthenticated" in c.hosts[REPLICA].log.read_text()
        c.stop(REPLICA)
    finally:
        plain.close()


def test_a_snapshot_read_before_a_change_on_the_node_does_not_undo_it(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    """REPLICA's placement pass reads the cluster's settings and is held there
    (`cluster.settings_read=sleep:8`) while `server set` on REPLICA changes and publishes them.
    The older snapshot must not be applied over that change afterwards, nor reach the other node
    with REPLICA's next publication (`auth new`): both nodes end enabled, with the entry."""
    c, other = stopped_cluster, "vmhost3"
    member = ("--name", "r", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", TTL)
    c.cli("cluster", "init", "--config", config(c, REPLICA), *member)
    c.cli("cluster", "join", "--config", config(c, other), *member)
    c.start(REPLICA, extra_env={"VMREPLICA_FAULTS": "cluster.settings_read=sleep:8"})
    c.start(other)
    time.sleep(10)  # REPLICA's pass with the cluster's first snapshot is over
    c.cli("server", "set", "--certificate-port", str(c.hosts[other].replica_port), host=other)
    time.sleep(3)  # REPLICA's next pass has read that snapshot (disabled) and is held with it
    c.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port",
          str(c.hosts[REPLICA].replica_port), host=REPLICA)  # fmt: skip
    time.sleep(8)  # that pass has gone on with what it read
    storage = str(c.base / "shared-storage")
    c.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location", storage,
          "--trust-group", "Production", host=REPLICA)  # fmt: skip

    def served(host: str) -> bool:
        enabled = c.cli_json("server", "get", "-o", "json", host=host)[0]["replication_enabled"]
        entries = c.cli_json("auth", "get", "-o", "json", host=host)
        return bool(enabled) and [e["allowed_primary_server"] for e in entries] == [PRIMARY]

    for host in (REPLICA, other):
        wait_for(lambda: served(host), 30, f"{host} enabled with the entry")  # noqa: B023
    time.sleep(10)  # passes held with any older snapshot have ended: still both
    assert served(REPLICA) and served(other)
