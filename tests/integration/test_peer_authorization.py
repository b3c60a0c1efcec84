"""Who may act on a replica VM over the peer listener, checked as a hostile peer would try it:
a host that the CA certified and that replication "from any server" admits, but that did not
create the replica, gets nothing of it (docs/ARCHITECTURE.md, Security)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from tests.integration import peer_tools as p
from tests.integration.peer_tools import peer_call, state_db, tree, vm_id
from tests.integration.replication_env import PRIMARY, REPLICA, Pair
from tests.integration.test_certificate_refusals import forge
from tests.localcluster import Cluster
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.transport.peer import PeerAddress, PeerClient
from vmreplica.errors import AccessDenied, InvalidArgument

STRANGER = "vmhost3"  # certified by the same CA, no authorization entry anywhere


@pytest.fixture(scope="module")
def any_server() -> Iterator[Pair]:
    """vmhost1 takes replication from any server of the CA (no entries); vmhost2 enabled the
    replication of VM app there (waiting for its initial copy)."""
    cluster = Cluster.create()
    try:
        cluster.start_all()
        port = cluster.hosts[REPLICA].replica_port
        storage = cluster.base / "any-storage"
        cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                    "--certificate-port", str(port), "--any-server", "true",
                    "--storage-location", str(storage), host=REPLICA)  # fmt: skip
        pair = Pair(cluster, port, storage)
        cluster.cli("vm", "new", "app", "--disk", "16M", host=PRIMARY)
        pair.enable("app")
        yield pair
    finally:
        cluster.close()


def replica_row(pair: Pair, vm: str) -> dict[str, object]:
    with state_db(pair.cluster, REPLICA) as conn:
        row = conn.execute("SELECT * FROM replications WHERE vm_id=?", (vm,)).fetchone()
    return dict(row)


SETTINGS = {
    "frequency_sec": 30, "recovery_history": 0, "snapshot_frequency_hour": None,
    "compression": False, "auto_resynchronize": False, "recovery_point_interval": 3600,
}  # fmt: skip


def test_any_server_admits_no_stranger_to_another_hosts_replica(any_server: Pair) -> None:
    """Trust groups join servers named by authorization entries; a peer admitted only because
    replication is allowed from any server has no entry, so it is no partner of a replica it
    did not create (it got the default trust group, which every such peer shares)."""
    cluster, port = any_server.cluster, any_server.port
    vm = vm_id(cluster, PRIMARY, "app")
    before, files = replica_row(any_server, vm), tree(any_server.storage)
    routes: list[tuple[str, dict[str, object]]] = [
        (p.STATUS, {"vm_id": vm, "settings": SETTINGS}),
        (p.INITIAL_OPEN, {"vm_id": vm}),
        ("/replication/v1/resync-start", {"vm_id": vm, "from_empty": True}),
        ("/replication/v1/resync-cancel", {"vm_id": vm}),
    ]
    for route, body in routes:
        with pytest.raises(AccessDenied, match="not authorized"):
            peer_call(cluster, STRANGER, REPLICA, port, route, body)
    with pytest.raises(AccessDenied, match="not authorized"):
        peer_call(cluster, STRANGER, REPLICA, port, f"{p.DELTA}?vm_id={vm}", b"x")
    assert replica_row(any_server, vm) == before
    assert tree(any_server.storage) == files
    # The creating server still gets its answers.
    answer = peer_call(cluster, PRIMARY, REPLICA, port, p.STATUS, {"vm_id": vm})
    assert answer["sequence"] == 0


def test_any_server_tells_no_stranger_whether_a_vm_runs(any_server: Pair) -> None:
    """vm-state (the split-brain check) answers only partners of the VM's relationship; on the
    primary too, where the replica's default trust group was recorded from its hello."""
    cluster = any_server.cluster
    vm = vm_id(cluster, PRIMARY, "app")
    port = cluster.hosts[PRIMARY].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), "--any-server", "true",
                "--storage-location", str(cluster.base / "v2-any"), host=PRIMARY)  # fmt: skip
    for host, host_port in ((PRIMARY, port), (REPLICA, any_server.port)):
        with pytest.raises(AccessDenied, match="no replication relationship"):
            peer_call(cluster, STRANGER, host, host_port, p.VM_STATE, {"vm_id": vm})
    assert peer_call(cluster, REPLICA, PRIMARY, port, p.VM_STATE, {"vm_id": vm}) == {"state": "Off"}


QEMU_ARGS = (
    "<domain type='kvm'><name>evil</name><uuid>{uuid}</uuid>"
    "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    "<qemu:arg value='-drive'/><qemu:arg value='file=/etc/shadow,if=virtio'/>"
    "</qemu:commandline><devices><disk type='file' device='disk'><source file='/x'/>"
    "<target dev='vda'/></disk></devices></domain>"
)


def test_a_peer_s_domain_xml_naming_host_files_is_refused_at_enable(any_server: Pair) -> None:
    """The replica host defines its failed-over VM from the XML a primary sent with enable:
    XML with QEMU arguments or a host path is refused then, and nothing is made."""
    cluster, port = any_server.cluster, any_server.port
    files = tree(any_server.storage)
    for xml in (QEMU_ARGS,
                QEMU_ARGS.split("<qemu:commandline")[0] + "<os><type>hvm</type><dtb>/etc/shadow"
                "</dtb></os><devices><disk type='file' device='disk'><source file='/x'/>"
                "<target dev='vda'/></disk></devices></domain>"):  # fmt: skip
        vm = str(uuid.uuid4())
        body = {
            "vm_id": vm, "vm_name": "evil", "cpus": 1, "memory_mb": 64, "disk_sizes": [1 << 20],
            "settings": SETTINGS, "replica_port": 443, "primary_port": None, "append": None,
            "kernel": None, "initrd": None, "definition": xml.format(uuid=vm),
        }  # fmt: skip
        with pytest.raises(InvalidArgument, match=r"cannot be replicated|path of its host"):
            peer_call(cluster, STRANGER, REPLICA, port, p.ENABLE, body)
    assert tree(any_server.storage) == files
    assert "evil" not in [v["name"] for v in cluster.cli_json("vm", "list", host=REPLICA)]


def test_a_certificate_that_names_no_host_is_refused_in_one_line(any_server: Pair) -> None:
    """A certificate of the CA without a DNS name (only a common name) names no peer: refused
    like a stranger's, before anything is made (replication from any server admits strangers,
    and every route keeps the name of the peer it serves)."""
    cluster, port = any_server.cluster, any_server.port
    nameless = cluster.base / "nameless"
    forge(cluster.ca_dir, "nameless.test", nameless, [EKU.SERVER_AUTH, EKU.CLIENT_AUTH], san=False)
    files = tree(any_server.storage)
    vm = str(uuid.uuid4())
    body = {
        "vm_id": vm, "vm_name": "nameless", "cpus": 1, "memory_mb": 64, "disk_sizes": [1 << 20],
        "settings": SETTINGS, "replica_port": 443, "primary_port": None, "append": None,
        "kernel": None, "initrd": None, "definition": None,
    }  # fmt: skip

    async def call(path: str, data: dict[str, object]) -> dict[str, object]:
        tls = TlsFiles(nameless / "ca.pem", nameless / "cert.pem", nameless / "key.pem")
        async with PeerClient(PeerAddress(REPLICA, "127.0.0.1", port), tls, 30) as client:
            return await client.call(path, data)

    for path, data in ((p.HELLO, {}), (p.ENABLE, body)):
        with pytest.raises(AccessDenied, match="names no host"):
            asyncio.run(call(path, data))
    assert tree(any_server.storage) == files
    assert "nameless" not in [v["name"] for v in cluster.cli_json("vm", "list", host=REPLICA)]
