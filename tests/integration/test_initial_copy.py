"""Initial replication over NBD with TLS (hypervisor/nbd_copy.py), against real agents, QEMU and
qemu-storage-daemon: the copy is the disk at the instant tracking began, kill -9 of either agent
at the copy's edges, a full replica disk, and a certificate the import does not admit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault import tmpfs
from tests.integration.qsd_tools import peer_socket_nodelay
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    make_pair,
    restart_with_faults,
    wait_for,
)
from tests.localcluster import Cluster, free_port
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.transport.peer import PeerAddress, PeerClient

OLD, Y_NEW, X_NEW = 0x11, 0xB1, 0xB2
Y_AT, X_AT = "1M", "100M"  # Y is written first, X second; a copy reads Y first too


def image_with_data(path: Path, size: str, allocated: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {OLD:#x} 0 {allocated}", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def reads(image: Path, pattern: int, offset: str, length: str = "64k") -> bool:
    """Whether ``image`` holds ``pattern`` over the range, read through QEMU."""
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} {length}",
         str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    if "Pattern verification failed" in done.stdout:
        return False
    assert done.returncode == 0, done.stdout + done.stderr
    return True


def guest_write(pair: Pair, pattern: int, offset: str, name: str = "app") -> None:
    """Write through the guest's own virtio device (``-d``, the virtio-blk backend), as the guest would: while a
    backup job fleeces the disk, its node takes no writer that bypasses the job's filter."""
    out = pair.cluster.cli(
        "vm",
        "monitor",
        name,
        f'qemu-io -d /machine/peripheral/vblk0/virtio-backend "write -P {pattern:#x} {offset} 64k"',
        host=PRIMARY,
    ).stdout
    assert "wrote" in out, out


def verified_equal(pair: Pair, name: str = "app") -> None:
    """Checked once the replica is quiet: a compared initial copy (a kept cut copy's retry, a
    seed, --compressed) ends with a cycle that runs at once, whose delta may still be applying
    when ``start-initial --wait`` returns, and a chain checked from outside meanwhile reads
    "half applied" (its apply.pending marker). ``sync`` returns once the replica has it all."""
    pair.cli("replication", "sync", name)
    asyncio.run(ReplicaChain(pair.tip(name, 0).parent).verify())
    assert pair.equal(name, 0)


def running_vm(pair: Pair, name: str = "app") -> None:
    disk = image_with_data(pair.cluster.base / f"{name}.qcow2", "256M", "128M")
    pair.cli("vm", "new", name, "--disk-path", str(disk))
    pair.cli("vm", "start", name)
    pair.enable(name)


@contextlib.contextmanager
def small_replica_storage(pair: Pair, size: str) -> Iterator[Path]:
    """The replica stores this primary's VMs on a tmpfs of ``size``."""
    small = pair.cluster.base / "small"
    with tmpfs(small, size):
        pair.cluster.cli("auth", "set", "--allowed-primary", PRIMARY, "--storage-location",
                         str(small), host=REPLICA)  # fmt: skip
        pair.storage = small
        yield small


def cycle_failures(cluster: Cluster) -> list[str]:
    """Messages of the primary's failed-cycle events."""
    events = cluster.cli_json("event", "list", host=PRIMARY)
    return [e["message"] for e in events if e["kind"] == "replication-cycle-failed"]


def processes_naming(path: Path) -> list[int]:
    """Pids of the processes whose command line names ``path`` (the replica's import daemon)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
    return found


def test_copy_is_the_disk_at_the_instant_tracking_began(cluster: Cluster) -> None:
    """Writes made after tracking began, while the copy runs, are not in the copy (so it is a
    crash-consistent point, not a smear of old and new), and the next cycle carries them."""
    pair = make_pair(cluster)
    running_vm(pair)
    restart_with_faults(cluster, PRIMARY, "primary.before_initial_copy=sleep:6")
    pair.cli("replication", "start-initial", "app")
    run_dir = cluster.hosts[PRIMARY].state_dir / "run"
    wait_for(lambda: any(run_dir.glob("*/initial/nbd.sock")), 20, "the point-in-time export")
    guest_write(pair, Y_NEW, Y_AT)
    guest_write(pair, X_NEW, X_AT)
    row = pair.replication("app")
    assert (
        row["state"] == "InitialReplicationInProgress" and not row["initial_replication_progress"]
    ), "the writes must land while the copy is held at its start"
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 120, "the initial copy")
    tip = pair.tip("app", 0)
    assert reads(tip, OLD, Y_AT) and reads(tip, OLD, X_AT), "the copy must predate both writes"
    assert reads(tip, OLD, "64M", "1M")
    pair.cli("replication", "sync", "app")
    assert reads(tip, Y_NEW, Y_AT) and reads(tip, X_NEW, X_AT)
    verified_equal(pair)


@pytest.mark.parametrize("point", ["primary.before_initial_copy", "primary.after_initial_copy"])
def test_kill_primary_agent_mid_initial_copy(cluster: Cluster, point: str) -> None:
    """Killed with its export and fleecing overlays open in the VM's QEMU (before), or with the
    replica's import still open (after): the restarted agent clears them and copies again."""
    pair = make_pair(cluster)
    running_vm(pair)
    restart_with_faults(cluster, PRIMARY, f"{point}=kill")
    pair.cli("replication", "start-initial", "app")
    process = cluster.hosts[PRIMARY].process
    assert process is not None and process.wait(60) == -signal.SIGKILL
    cluster.hosts[PRIMARY].process = None
    cluster.start(PRIMARY)
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 120, "the copy again")
    assert not list((cluster.hosts[PRIMARY].state_dir / "run").glob("*/initial"))
    pair.write("app", 0, 0x5C, "200M", "1M")
    pair.cli("replication", "sync", "app")
    verified_equal(pair)
    assert reads(pair.tip("app", 0), 0x5C, "200M", "1M")


@pytest.mark.parametrize("action", ["kill", "error"])
def test_primary_fails_with_the_replicas_open_in_flight(cluster: Cluster, action: str) -> None:
    """The primary sends initial-open as soon as it knows the space needed, and reads the
    disks' sizes and starts tracking while the replica prepares: killed (-9) or failing there,
    the import it asked for is closed, and the copy done again is the disk."""
    pair = make_pair(cluster)
    disk = image_with_data(cluster.base / "off.qcow2", "256M", "64M")
    pair.cli("vm", "new", "app", "--disk-path", str(disk))  # off: qemu-img reads the image
    pair.enable("app")
    restart_with_faults(cluster, PRIMARY, f"primary.initial_open_sent={action}")
    if action == "kill":
        pair.cli("replication", "start-initial", "app")
        process = cluster.hosts[PRIMARY].process
        assert process is not None and process.wait(60) == -signal.SIGKILL
        cluster.hosts[PRIMARY].process = None
        cluster.start(PRIMARY)  # retries the copy at once
    else:
        failed = pair.cli("replication", "start-initial", "app", "--wait", check=False)
        assert failed.returncode != 0 and "retried" in failed.stderr, failed.stderr
        staging = pair.storage / "app" / "staging"
        wait_for(lambda: not processes_naming(staging), 30, "the replica's import closed")
        restart_with_faults(cluster, PRIMARY, "")  # retries the copy at once
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 120, "the copy again")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 100M 1M", str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    verified_equal(pair)
    assert reads(pair.tip("app", 0), 0x5E, "100M", "1M") and reads(pair.tip("app", 0), OLD, "0")


def test_kill_replica_agent_after_import(cluster: Cluster) -> None:
    """The replica dies with the copy staged and journaled: it adopts the copy on restart, and
    the primary, told the copy is there, does not send it again."""
    pair = make_pair(cluster)
    running_vm(pair)
    restart_with_faults(cluster, REPLICA, "replica.after_stage=kill")
    failed = cluster.cli("replication", "start-initial", "app", "--wait", host=PRIMARY, check=False)
    assert failed.returncode != 0 and "retried" in failed.stderr, failed.stderr
    process = cluster.hosts[REPLICA].process
    assert process is not None and process.wait(10) == -signal.SIGKILL
    cluster.hosts[REPLICA].process = None
    cluster.start(REPLICA)
    assert pair.replication("app", host=REPLICA)["state"] == "Replicating"
    pair.cli("replication", "start-initial", "app", "--wait")
    kinds = [e["kind"] for e in cluster.cli_json("event", "list", host=REPLICA)]
    assert "recovered" in kinds
    pair.write("app", 0, 0x6D, "130M", "1M")
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def test_initial_copy_refused_when_the_replica_lacks_space(cluster: Cluster) -> None:
    """Checked before a byte moves (the primary sends what the copy needs): one clear error."""
    pair = make_pair(cluster)
    with small_replica_storage(pair, "48M") as small:
        running_vm(pair)  # 128 MiB of data
        full = cluster.cli(
            "replication", "start-initial", "app", "--wait", host=PRIMARY, check=False
        )
        assert full.returncode != 0 and "disk full" in full.stderr, full.stderr
        assert "needs" in full.stderr and "Traceback" not in full.stderr
        assert pair.replication("app", host=REPLICA)["state"] == "WaitingForInitialReplication"
        assert not list(small.glob("app/staging/*/*")), "nothing of the refused copy is kept"
        subprocess.run(["mount", "-o", "remount,size=512M", str(small)], check=True)
        pair.cli("replication", "start-initial", "app", "--wait")
        verified_equal(pair)


def test_replica_disk_fills_during_initial_copy(cluster: Cluster) -> None:
    """The space is there when the copy starts and gone before it ends: the copy fails with a
    clear error, its partial images are dropped, and it succeeds once space is back."""
    pair = make_pair(cluster)
    with small_replica_storage(pair, "256M") as small:
        running_vm(pair)  # 128 MiB of data
        restart_with_faults(cluster, PRIMARY, "primary.before_initial_copy=sleep:5")
        pair.cli("replication", "start-initial", "app")
        wait_for(lambda: any(small.glob("app/staging/1/disk0.qcow2")), 20, "the import")
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", str(shutil.disk_usage(small).free - (32 << 20)),
                        str(filler)], check=True)  # fmt: skip
        wait_for(lambda: bool(cycle_failures(cluster)), 60, "the copy to fail")
        assert "disk full on the replica" in cycle_failures(cluster)[0], cycle_failures(cluster)
        assert pair.replication("app", host=REPLICA)["state"] == "WaitingForInitialReplication"
        wait_for(lambda: not list(small.glob("app/staging/*/*")), 10, "the partial copy to go")
        filler.unlink()
        pair.cli("replication", "start-initial", "app", "--wait")
        verified_equal(pair)


def test_import_admits_only_the_authorized_sender(cluster: Cluster) -> None:
    """The replica's NBD server checks the client certificate's name, not only its CA: vmhost3
    holds a certificate from the same CA and is refused; vmhost2, the primary, is admitted."""
    pair = make_pair(cluster)
    # The replica serves initial copies on the one port its host.toml allows.
    allowed = free_port()
    config = cluster.hosts[REPLICA].config
    config.write_text(f'initial_copy_ports = "{allowed}-{allowed}"\n' + config.read_text())
    cluster.stop(REPLICA)
    cluster.start(REPLICA)
    cluster.cli("vm", "new", "app", "--disk", "32M", host=PRIMARY)
    pair.enable("app")
    vm_id = pair.replication("app")["vm_id"]
    tls = TlsFiles(
        *(cluster.hosts[PRIMARY].dir / "tls" / f for f in ("ca.pem", "cert.pem", "key.pem"))
    )

    async def open_import() -> dict[str, object]:
        peer = PeerAddress(REPLICA, "127.0.0.1", pair.port)
        async with PeerClient(peer, tls) as client:
            answer = await client.call("/replication/v1/initial-open", {"vm_id": vm_id})
            assert isinstance(answer, dict)
            return answer

    opened = asyncio.run(open_import())
    port, export = int(str(opened["port"])), str(opened["exports"][0])  # type: ignore[index]
    assert port == allowed

    def connect(host: str) -> subprocess.CompletedProcess[str]:
        creds = cluster.base / f"creds-{host}"
        creds.mkdir(exist_ok=True)
        for name, file in (("ca-cert.pem", "ca.pem"), ("client-cert.pem", "cert.pem"),
                           ("client-key.pem", "key.pem")):  # fmt: skip
            (creds / name).unlink(missing_ok=True)
            (creds / name).symlink_to(cluster.hosts[host].dir / "tls" / file)
        return subprocess.run(
            ["qemu-img", "info", "--object", f"tls-creds-x509,id=t,dir={creds},endpoint=client",
             "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
             f"server.port={port},export={export},tls-creds=t,tls-hostname={REPLICA}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    # The daemon's connections carry TCP_NODELAY (from the listening socket the agent made): else
    # its replies of several small writes wait 40 ms each for the client's delayed ACK.
    daemon = processes_naming(pair.storage / "app" / "staging" / "1" / "disk0.qcow2")
    with socket.create_connection(("127.0.0.1", port)) as client:
        peer = client.getsockname()[:2]
        wait_for(lambda: peer_socket_nodelay(daemon[0], peer) is not None, 10, "the accept")
        assert peer_socket_nodelay(daemon[0], peer) is True
    refused = connect("vmhost3")
    assert refused.returncode != 0, refused.stdout
    admitted = connect(PRIMARY)
    assert admitted.returncode == 0, admitted.stderr
    assert "virtual size: 32 MiB" in admitted.stdout


def test_import_lost_mid_copy(cluster: Cluster) -> None:
    """The replica's import daemon dies before the data arrives (as when the network between the
    sites drops the NBD connection): one clear error, the VM's QEMU is left with no export or
    fleecing overlay, and the copy succeeds when started again."""
    pair = make_pair(cluster)
    running_vm(pair)
    restart_with_faults(cluster, PRIMARY, "primary.before_initial_copy=sleep:5")
    pair.cli("replication", "start-initial", "app")
    staging = pair.storage / "app" / "staging" / "1" / "disk0.qcow2"

    def serving() -> bool:
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        return any(f"pid={pid}," in listening for pid in processes_naming(staging))

    wait_for(serving, 20, "the replica's import daemon to listen")
    # Killed only once the replica has started it and answered (its "serving" line): killed
    # earlier, the replica's own start-up of the daemon fails instead, with another message.
    replica_log = cluster.hosts[REPLICA].log
    wait_for(lambda: "initial copy of app: serving" in replica_log.read_text(), 20, "the open")
    for pid in processes_naming(staging):
        os.kill(pid, signal.SIGKILL)

    wait_for(lambda: bool(cycle_failures(cluster)), 30, "the failure")
    assert "initial copy of disk 0" in cycle_failures(cluster)[0], cycle_failures(cluster)
    failed = cluster.cli("replication", "start-initial", "app", "--wait", host=PRIMARY, check=False)
    # That retry is held 5 s at the same point, then copies: it succeeds.
    assert failed.returncode == 0, failed.stderr
    assert pair.replication("app")["state"] == "Replicating"
    assert not list((cluster.hosts[PRIMARY].state_dir / "run").glob("*/initial"))
    pair.write("app", 0, 0x7E, "210M", "1M")
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def test_remove_during_initial_copy_leaves_nothing(cluster: Cluster) -> None:
    """`replication remove` while a copy is in flight. On the primary: the copy stops, the VM's
    QEMU keeps no export, overlay or bitmap, and the primary closes the replica's import. On the
    replica, with the primary gone: the import daemon and its images go."""
    pair = make_pair(cluster)
    running_vm(pair)
    restart_with_faults(cluster, PRIMARY, "primary.before_initial_copy=sleep:30")
    run_dir = cluster.hosts[PRIMARY].state_dir / "run"
    staging = pair.storage / "app" / "staging" / "1" / "disk0.qcow2"

    def import_open() -> bool:
        return bool(processes_naming(staging))

    pair.cli("replication", "start-initial", "app")
    wait_for(lambda: any(run_dir.glob("*/initial/nbd.sock")), 20, "the point-in-time export")
    wait_for(import_open, 20, "the replica's import")
    pair.cli("replication", "remove", "app")
    assert not list(run_dir.glob("*/initial"))
    blocks = cluster.cli("vm", "monitor", "app", "info block -n", host=PRIMARY).stdout
    assert "vmr-f" not in blocks and "fleece" not in blocks, blocks
    info = cluster.cli("vm", "monitor", "app", "info block -v disk0", host=PRIMARY).stdout
    assert "vmreplica-" not in info, info
    assert not import_open() and not staging.exists()
    assert pair.json("vm", "get", "app")[0]["state"] == "Running"

    # Another VM, and the primary dies mid-copy: only the replica's own remove can close it.
    running_vm(pair, "db")
    staging = pair.storage / "db" / "staging" / "1" / "disk0.qcow2"
    pair.cli("replication", "start-initial", "db")
    wait_for(import_open, 20, "the replica's import")
    replica_log = cluster.hosts[REPLICA].log
    wait_for(lambda: "initial copy of db: serving" in replica_log.read_text(), 20, "the export")
    cluster.kill(PRIMARY)
    assert import_open()
    pair.cli("replication", "remove", "db", host=REPLICA)
    assert not import_open() and not staging.exists()
