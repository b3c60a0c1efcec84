"""A node of a replica cluster that held a replica VM and lost it (killed, its VM taken over by
another node) keeps its old rows. Every replication route sends a primary on to the owner from
it (421, transport/redirect.py) before it touches anything: its facts are older than the shared
storage's, and the chains there are the owner's. Were the resynchronization routes served, a
resync-start would lay overlays on the owner's chains, and a resync-cancel would drop the ones
of a resynchronization the owner has under way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import owned, replicate_app, serve_replica_cluster
from tests.integration.peer_tools import peer_call
from tests.integration.replication_env import PRIMARY, REPLICA, wait_for
from tests.localcluster import Cluster
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.redirect import Redirected

OTHER = "vmhost3"


def _files(storage: Path) -> dict[str, int]:
    return {
        str(f.relative_to(storage)): f.stat().st_size for f in storage.rglob("*") if f.is_file()
    }


def test_a_former_owner_sends_every_replication_request_on_to_the_owner(
    stopped_cluster: Cluster, etcd: EtcdCluster
) -> None:
    c = stopped_cluster
    member = ("--name", "r", "--etcd", etcd.endpoints_arg, *etcd.tls_args, "--lease-ttl", "3")
    c.cli("cluster", "init", "--config", str(c.hosts[REPLICA].config), *member)
    c.cli("cluster", "join", "--config", str(c.hosts[OTHER].config), *member)
    c.start_all()
    port1, _port3, storage = serve_replica_cluster(c, REPLICA, OTHER)
    replicate_app(c, REPLICA, port1, storage)
    vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])

    agent = c.hosts[REPLICA].process  # the owner dies; the other node takes the VM over
    assert agent is not None
    agent.kill()
    agent.wait()
    c.hosts[REPLICA].process = None
    wait_for(lambda: owned(c, OTHER) == [vm_id], 30, "the takeover")
    c.start(REPLICA)  # back, with its old rows
    assert c.cli_json("replication", "get", "app", "-o", "json", host=REPLICA)[0]["state"] == (
        "Replicating"
    )
    before = _files(storage)
    for route, body in (
        (p.RESYNC_START, {"vm_id": vm_id}),
        (p.RESYNC_CANCEL, {"vm_id": vm_id}),
        (p.RESYNC_FINISH, {"vm_id": vm_id}),
        (p.RESYNC_HASHES, {"vm_id": vm_id, "disk": 0, "block_size": 65536, "first_block": 0,
                           "count": 1}),
        (p.INITIAL_CLOSE, {"vm_id": vm_id, "ok": True}),
        (p.INITIAL_OPEN, {"vm_id": vm_id, "required_bytes": 1 << 20}),
    ):  # fmt: skip
        with pytest.raises(Redirected, match=f"owned by node {OTHER}"):
            peer_call(c, PRIMARY, REPLICA, port1, route, body)
    time.sleep(0.5)
    assert _files(storage) == before  # nothing written in the owner's storage
    row = c.cli_json("replication", "get", "app", "-o", "json", host=REPLICA)[0]
    assert row["state"] == "Replicating"
    kinds = {e["kind"] for e in c.cli_json("event", "list", "-o", "json", host=REPLICA)}
    assert "resync-started" not in kinds
