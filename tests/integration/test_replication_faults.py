"""Every failure path of the replication core, injected for real: kill -9 of either agent at
chosen points, a connection cut mid-transfer, corrupted / replayed / out-of-order / oversized
deltas from a misbehaving peer, unauthorized senders, a full replica disk, an unreachable
replica, and a QEMU killed -9. After each: nothing acknowledged is lost, and the replica chain
verifies and equals the primary."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault import tmpfs
from tests.integration.peer_tools import TcpProxy
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    make_pair,
    replicated_vm,
    restart_with_faults,
    verified_equal,
    wait_for,
)
from tests.localcluster import Cluster
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport.peer import PeerAddress, PeerClient
from vmreplica.errors import AccessDenied, IntegrityError, ResyncRequired, VmrError


@pytest.mark.parametrize(
    "point", ["primary.after_cut", "primary.after_commit", "primary.before_send"]
)
def test_kill_primary_agent_mid_cycle(cluster: Cluster, point: str) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    pair.write("app", 0, 0x22, "2M", "512k")
    restart_with_faults(cluster, PRIMARY, f"{point}=kill")
    # A restarted agent resumes its schedule at once: that cycle (or this sync, whichever comes
    # first) reaches the fault point and the agent dies there.
    result = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
    assert result.returncode != 0
    process = cluster.hosts[PRIMARY].process
    assert process is not None and process.wait(10) == -signal.SIGKILL
    cluster.hosts[PRIMARY].process = None
    cluster.start(PRIMARY)
    pair.write("app", 0, 0x33, "3M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)
    assert pair.replication("app")["state"] == "Replicating"


@pytest.mark.parametrize("point", ["replica.after_stage", "replica.mid_apply"])
def test_kill_replica_agent_mid_apply(cluster: Cluster, point: str) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    restart_with_faults(cluster, REPLICA, f"{point}=kill")
    pair.write("app", 0, 0x44, "5M", "1M")
    assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    process = cluster.hosts[REPLICA].process
    assert process is not None and process.wait(10) == -signal.SIGKILL
    cluster.hosts[REPLICA].process = None
    cluster.start(REPLICA)
    events = [e["kind"] for e in cluster.cli_json("event", "list", host=REPLICA)]
    if point == "replica.mid_apply":
        assert "recovered" in events, "the interrupted apply is finished on restart"
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)


def test_connection_cut_mid_transfer(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    proxy = TcpProxy(pair.port)
    try:
        pair.port = proxy.port
        replicated_vm(pair, "app", "--compression", "false")
        proxy.limit = 200_000
        subprocess.run(["true"], check=True)
        pair.write("app", 0, 0x55, "8M", "4M")
        cut = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
        assert cut.returncode == 6, cut.stderr
        measured = pair.measure("app")
        assert measured["pending_replication_size"] > 0 and measured["health"] == "Critical"
        assert pair.replication("app", REPLICA)["last_replication_time"] is not None
        proxy.limit = None
        cluster.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)
        assert pair.measure("app")["pending_replication_size"] == 0
    finally:
        proxy.close()


def _send_crafted(cluster: Cluster, sender: str, port: int, vm_id: str, delta_dir: Path,
                  manifest: wire.DeltaManifest, corrupt_at: int | None = None,
                  announce: wire.DeltaManifest | None = None) -> None:  # fmt: skip
    """Send a delta as a peer would, optionally flipping one byte of the stream."""
    tls_dir = cluster.hosts[sender].dir / "tls"
    tls = TlsFiles(tls_dir / "ca.pem", tls_dir / "cert.pem", tls_dir / "key.pem")

    async def body() -> bytes:
        chunks = [c async for c in wire.iter_stream(delta_dir, manifest)]
        data = bytearray(b"".join(chunks))
        if announce is not None:
            # Swap the header's manifest for one that lies, keeping the real disk data.
            old_len = int.from_bytes(data[len(wire.MAGIC) : len(wire.MAGIC) + 4], "big")
            new = announce.to_json().encode()
            data[len(wire.MAGIC) : len(wire.MAGIC) + 4 + old_len] = (
                len(new).to_bytes(4, "big") + new
            )
        if corrupt_at is not None:
            data[corrupt_at % len(data)] ^= 0xFF
        return bytes(data)

    async def send() -> None:
        payload = await body()
        async with PeerClient(PeerAddress(REPLICA, "127.0.0.1", port), tls) as client:
            await client.call(f"/replication/v1/delta?vm_id={vm_id}", data=payload)

    asyncio.run(send())


@pytest.fixture
def crafted(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Pair, str, Path]]:
    """A replicated VM, and a hand-made delta (64k of 0xEE at 1M) that a peer could send."""
    pair = make_pair(cluster)
    replicated_vm(pair)
    vm_id = str(pair.replication("app")["vm_id"])
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(delta_dir / "disk0.qcow2"), "64M"],
        check=True,
    )
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 1M 64k", str(delta_dir / "disk0.qcow2")],
                   check=True, capture_output=True)  # fmt: skip
    yield pair, vm_id, delta_dir


def _replica_sequence(pair: Pair) -> int:
    return int(str(pair.measure("app", REPLICA)["successful_replication_count"]))


def test_refused_deltas_store_nothing(cluster: Cluster, crafted: tuple[Pair, str, Path]) -> None:
    pair, vm_id, delta_dir = crafted
    applied = _replica_sequence(pair)
    seq = applied  # the replica's last sequence equals its count of applied deltas here

    def manifest(sequence: int, compression: str = "zstd") -> wire.DeltaManifest:
        for f in delta_dir.glob("manifest.json"):
            f.unlink()
        return asyncio.run(
            wire.build_manifest(delta_dir, vm_id, sequence, "CrashConsistent", compression)
        )

    cases: list[tuple[str, int, int | None, type[VmrError], str]] = [
        (PRIMARY, seq, None, IntegrityError, "already applied"),
        (PRIMARY, seq + 2, None, ResyncRequired, "out of sequence"),
        (PRIMARY, seq + 1, -100, IntegrityError, "corrupted in transit"),
        ("vmhost3", seq + 1, None, AccessDenied, "not authorized"),
    ]
    for sender, sequence, corrupt, error, text in cases:
        with pytest.raises(error) as caught:
            _send_crafted(cluster, sender, pair.port, vm_id, delta_dir, manifest(sequence), corrupt)
        assert text in caught.value.message
    # Uncompressed, a flipped byte is caught by the end-to-end hash.
    with pytest.raises(IntegrityError, match="hash mismatch"):
        _send_crafted(
            cluster, PRIMARY, pair.port, vm_id, delta_dir, manifest(seq + 1, "none"), -100
        )
    # A wrong size in the manifest.
    real = manifest(seq + 1)
    lying = wire.DeltaManifest(real.vm_id, real.sequence, real.created, real.consistency, real.compression,
                               (wire.DiskEntry(0, real.disks[0].file_size - 1000, real.disks[0].blake3),))  # fmt: skip
    with pytest.raises(IntegrityError) as lied:
        _send_crafted(cluster, PRIMARY, pair.port, vm_id, delta_dir, real, announce=lying)
    assert "larger than announced" in lied.value.message
    # Another trust group may not write into this replica.
    cluster.cli("auth", "new", "--allowed-primary", "vmhost3", "--storage-location", str(cluster.base / "z"),
                "--trust-group", "Other", host=REPLICA)  # fmt: skip
    with pytest.raises(AccessDenied) as denied:
        _send_crafted(cluster, "vmhost3", pair.port, vm_id, delta_dir, manifest(seq + 1))
    assert "trust group Other" in denied.value.message

    assert _replica_sequence(pair) == applied, "nothing was applied"
    staging = pair.storage / "app" / "staging"
    assert not staging.exists() or not any(staging.rglob("*.qcow2*")), "nothing was stored"
    refused = [
        e
        for e in cluster.cli_json("event", "list", host=REPLICA)
        if e["kind"] in ("delta-refused", "peer-refused")
    ]
    assert len(refused) >= 7, "\n".join(e["message"] for e in refused)
    # The real primary carries on, and the replica equals it.
    pair.write("app", 0, 0x66, "6M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)


def test_sequence_gap_requires_resync(cluster: Cluster) -> None:
    """A delta lost from the pending log: the next one is out of sequence on the replica."""
    pair = make_pair(cluster)
    replicated_vm(pair)
    cluster.stop(REPLICA)
    for pattern in (0x91, 0x92):
        pair.write("app", 0, pattern, "9M", "64k")
        assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode == 6
    pending = (
        cluster.hosts[PRIMARY].state_dir
        / "replication"
        / str(pair.replication("app")["vm_id"])
        / "pending"
    )
    first = min(pending.iterdir(), key=lambda p: int(p.name))
    subprocess.run(["rm", "-rf", str(first)], check=True)
    cluster.start(REPLICA)
    gap = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
    assert gap.returncode == 9 and "out of sequence" in gap.stderr, gap.stderr
    assert pair.replication("app")["state"] == "WaitingForStartResynchronize"
    assert pair.measure("app")["health"] == "Critical"
    asyncio.run(ReplicaChain(pair.tip("app", 0).parent).verify())


def test_replica_disk_full(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    small = cluster.base / "small"
    with tmpfs(small, "24M"):
        cluster.cli(
            "auth",
            "set",
            "--allowed-primary",
            PRIMARY,
            "--storage-location",
            str(small),
            host=REPLICA,
        )
        pair.storage = small
        replicated_vm(pair)
        pair.write("app", 0, 0x71, "16M", "30M")
        full = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
        assert full.returncode == 7 and "disk full" in full.stderr, full.stderr
        assert pair.measure("app")["pending_replication_size"] > 0
        asyncio.run(ReplicaChain(pair.tip("app", 0).parent).verify())
        subprocess.run(["mount", "-o", "remount,size=256M", str(small)], check=True)
        cluster.cli("replication", "sync", "app", host=PRIMARY)
        verified_equal(pair)


def test_unreachable_replica_queues_deltas(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    cluster.stop(REPLICA)
    for i, pattern in enumerate((0x81, 0x82, 0x83)):
        pair.write("app", 0, pattern, f"{i + 1}M", "256k")
        assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode == 6
    measured = pair.measure("app")
    assert measured["health"] == "Critical" and measured["replication_errors"] == 3
    assert any("unreachable" in d for d in measured["health_details"])
    pending = (
        cluster.hosts[PRIMARY].state_dir
        / "replication"
        / str(pair.replication("app")["vm_id"])
        / "pending"
    )
    assert len(list(pending.iterdir())) == 3
    cluster.start(REPLICA)
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)
    assert list(pending.iterdir()) == []
    assert pair.measure("app")["pending_replication_size"] == 0


def test_qemu_killed_requires_resync(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    for pid in cluster.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: pair.replication("app")["state"] == "WaitingForStartResynchronize",
        30,
        "resync required",
    )
    measured = pair.measure("app")
    assert measured["health"] == "Critical"
    assert any("resynchronization required" in d for d in measured["health_details"])
    refused = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
    assert refused.returncode != 0
    # Starting the VM again does not bring the untrusted bitmap back into use.
    cluster.cli("vm", "start", "app", host=PRIMARY)
    assert pair.replication("app")["state"] == "WaitingForStartResynchronize"
