"""Shared set-up for replication tests: vmhost1 is the replica server, vmhost2 the primary."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.localcluster import Cluster, Result
from vmreplica._internal.drivers.qemu.chain import ReplicaChain

PRIMARY, REPLICA = "vmhost2", "vmhost1"


@dataclass
class Pair:
    cluster: Cluster
    port: int
    storage: Path

    def cli(
        self, *args: str, host: str = PRIMARY, check: bool = True, timeout: float = 120.0
    ) -> Result:
        return self.cluster.cli(*args, host=host, check=check, timeout=timeout)

    def json(self, *args: str, host: str = PRIMARY) -> list[dict[str, Any]]:
        rows = self.cluster.cli_json(*args, host=host)
        assert isinstance(rows, list)
        return rows

    def write(
        self, vm: str, disk: int, pattern: int, offset: str, length: str, host: str = PRIMARY
    ) -> None:
        out = self.cluster.cli(
            "vm",
            "monitor",
            vm,
            f'qemu-io disk{disk} "write -P {pattern:#x} {offset} {length}"',
            host=host,
        ).stdout
        assert "wrote" in out, out

    def equal(self, vm: str, disk: int) -> bool:
        """The replica's latest point reads exactly as the primary's disk does now.

        A running QEMU caches qcow2 metadata, so the image file is only complete for an outside
        reader after a flush.
        """
        if self.json("vm", "get", vm)[0]["state"] == "Running":
            self.cluster.cli("vm", "monitor", vm, f'qemu-io disk{disk} "flush"', host=PRIMARY)
        return same_content(self.primary_disk(vm, disk), self.tip(vm, disk))

    def tip(self, vm: str, disk: int) -> Path:
        return self.storage / vm / f"disk{disk}" / "tip.qcow2"

    def primary_disk(self, vm: str, disk: int) -> Path:
        return Path(str(self.json("vm", "get", vm)[0]["disks"][disk]))

    def replication(self, vm: str, host: str = PRIMARY) -> dict[str, Any]:
        return self.json("replication", "get", vm, host=host)[0]

    def measure(self, vm: str, host: str = PRIMARY) -> dict[str, Any]:
        return self.json("replication", "measure", vm, host=host)[0]

    def enable(self, vm: str, *extra: str) -> dict[str, Any]:
        return self.json(
            "replication", "enable", vm, "--replica-server", REPLICA, "--replica-port", str(self.port),
            "--auth", "certificate", *extra,
        )[0]  # fmt: skip

    def start(self, vm: str) -> None:
        self.cluster.cli("replication", "start-initial", vm, "--wait", host=PRIMARY, timeout=600)
        assert self.replication(vm)["state"] == "Replicating"


def make_pair(cluster: Cluster) -> Pair:
    port = cluster.hosts[REPLICA].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate", "--certificate-port", str(port),
                host=REPLICA)  # fmt: skip
    storage = cluster.base / "replica-storage"
    cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location", str(storage),
                "--trust-group", "Production", host=REPLICA)  # fmt: skip
    return Pair(cluster, port, storage)


def same_content(a: Path, b: Path) -> bool:
    """Identical guest-visible content, read through QEMU (-U: the primary may be running).

    A replica chain read from outside can be caught in the middle of a step that a cycle the
    scheduler started by itself takes after the one the test waited for: a recovery point
    being frozen (``tip`` renamed to ``rp-N``, the new ``tip`` not made yet), an oldest point
    being folded into ``base``. Such a read fails to open an image, rather than reading other
    content (each step keeps the chain's content), so it is read again; a difference is final."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True
        )
        if done.returncode in (0, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def qemu_img_check(path: Path) -> None:
    done = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def restart_with_faults(cluster: Cluster, host: str, faults: str) -> None:
    """Restart an agent with fault injection points armed (see vmreplica._internal.faults)."""
    cluster.stop(host)
    os.environ["VMREPLICA_FAULTS"] = faults
    try:
        cluster.start(host)
    finally:
        del os.environ["VMREPLICA_FAULTS"]


def replicated_vm(pair: Pair, name: str = "app", *extra: str) -> None:
    """A running VM with 1 MiB written, replicating to the replica (initial copy done)."""
    pair.cluster.cli("vm", "new", name, "--disk", "64M", host=PRIMARY)
    pair.cluster.cli("vm", "start", name, host=PRIMARY)
    pair.write(name, 0, 0x11, "0", "1M")
    pair.enable(name, *extra)
    pair.start(name)


def verified_equal(pair: Pair, name: str = "app") -> None:
    """The replica's chain verifies, and its latest point equals the primary's disk.

    Checked once no apply runs: a cycle the scheduler started by itself (one runs at once after
    a compared initial copy) may still be applying when the command the test waited on returns,
    and a chain read from outside meanwhile is "half applied" (its apply.pending marker). A
    marker that stays fails the verify below."""
    pending = pair.tip(name, 0).parent / "apply.pending"
    deadline = time.monotonic() + 60
    while pending.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    asyncio.run(ReplicaChain(pair.tip(name, 0).parent).verify())
    assert pair.equal(name, 0)


def died_by_sigkill(cluster: Cluster, host: str) -> None:
    """The agent a fault point killed is gone, and the cluster knows it."""
    process = cluster.hosts[host].process
    assert process is not None and process.wait(30) == -signal.SIGKILL
    cluster.hosts[host].process = None
