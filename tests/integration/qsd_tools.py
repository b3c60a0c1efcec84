"""Disks for tests of the block layer: qcow2 images, storage daemons that are always stopped,
writes through a daemon's NBD server, and what qemu-img and qemu-io read back from the files."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd

from vmreplica._internal.drivers.qemu.qmp import EventSubscription
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon, start_storage_daemon
from vmreplica.errors import InvalidState

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB  # qcow2's default, and so the default bitmap granularity

Range = tuple[int, int]


def reap(root: Path) -> None:
    """SIGKILL every process whose command line mentions ``root``: a failed test leaks none."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in argv:
            pids.append(int(entry.name))
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}/cmdline").exists():
            time.sleep(0.02)


def qcow2(path: Path, size: int, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    args += ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run([*args, str(path), str(size)], check=True)
    return path


def add_bitmap(disk: Path, name: str, granularity: int | None = None) -> None:
    """A persistent, enabled bitmap added while nothing has the image open."""
    args = ["qemu-img", "bitmap", "--add", str(disk), name]
    args += ["-g", str(granularity)] if granularity else []
    subprocess.run(args, check=True)


def qemu_io(image: Path, *commands: str, read_only: bool = False) -> str:
    """Run qemu-io commands on an image nothing else has open; fail on any error they report.

    A persistent enabled bitmap of the image records what qemu-io writes, as QEMU's would.
    """
    args = ["qemu-io", "-f", "qcow2"] + (["-r"] if read_only else [])
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, str(image)], capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def assert_reads(image: Path, *expected: tuple[int, int, int]) -> None:
    """Each ``(offset, length, byte)``: the image reads ``length`` bytes of ``byte`` there."""
    commands = [f"read -P 0x{byte:02x} {offset} {length}" for offset, length, byte in expected]
    qemu_io(image, *commands, read_only=True)


def mapped(image: Path) -> tuple[list[Range], list[Range]]:
    """Ranges the image itself holds as data, and as zero clusters, each merged and sorted."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-U", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data: list[Range] = []
    zeros: list[Range] = []
    for e in json.loads(out):
        if e["depth"] != 0 or not e["present"]:
            continue  # unallocated here: read from the backing file, or as zeros without one
        ranges = data if e["data"] else zeros
        if ranges and ranges[-1][0] + ranges[-1][1] == e["start"]:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + e["length"])
        else:
            ranges.append((e["start"], e["length"]))
    return data, zeros


def image_info(image: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, which a running QEMU may hold open."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def stored_bitmaps(image: Path) -> dict[str, set[str]]:
    """Persistent bitmaps in the image header and their flags."""
    data = image_info(image).get("format-specific", {}).get("data", {})
    return {b["name"]: set(b["flags"]) for b in data.get("bitmaps", [])}


def cluster_size(image: Path) -> int:
    return int(image_info(image)["cluster-size"])


@dataclass(frozen=True)
class Live:
    """A bitmap as the daemon holds it in memory."""

    recording: bool
    count: int  # dirty bytes
    inconsistent: bool = False


async def live_bitmaps(qsd: StorageDaemon, node: str = "disk0") -> dict[str, Live]:
    nodes = await qsd.execute("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    (info,) = [n for n in nodes if n["node-name"] == node]
    return {
        b["name"]: Live(b["recording"], b["count"], b.get("inconsistent", False))
        for b in info.get("dirty-bitmaps", [])
        if "name" in b  # a backup job's own bitmap has none
    }


async def leftovers(qsd: StorageDaemon) -> tuple[list[str], list[object]]:
    """Nodes the code under test added (named ``vmr-…``) and block jobs still there."""
    nodes = await qsd.execute("query-named-block-nodes", {"flat": True})
    jobs = await qsd.execute("query-block-jobs")
    assert isinstance(nodes, list) and isinstance(jobs, list)
    return [n["node-name"] for n in nodes if n["node-name"].startswith("vmr")], jobs


@contextlib.asynccontextmanager
async def daemon(disks: Sequence[Path], run_dir: Path) -> AsyncIterator[StorageDaemon]:
    """A storage daemon on ``disks``, stopped cleanly (bitmaps stored) unless the test killed it."""
    qsd = await start_storage_daemon(tuple(disks), run_dir)
    try:
        yield qsd
    finally:
        try:
            await qsd.stop()
        except InvalidState:
            pass  # killed by the test
        except BaseException:
            await qsd.kill()
            raise


class NbdWriter:
    """Writes into a daemon's nodes through its NBD server: the block layer's own write path, so
    the nodes' dirty bitmaps record them as they would a guest's.

    The exports are added when the writer opens, so they are already in place when a block job
    inserts its copy-before-write filter above a node, and writes then go through the filter as
    a running VM's do. Close it before anything else starts an NBD server on the daemon: there
    can only be one.
    """

    def __init__(self, qsd: StorageDaemon, socket: Path, nodes: Sequence[str]) -> None:
        self.qsd = qsd
        self.socket = socket
        self.nodes = list(nodes)
        self.handles: dict[str, nbd.NBD] = {}

    async def __aenter__(self) -> NbdWriter:
        addr = {"type": "unix", "data": {"path": str(self.socket)}}
        await self.qsd.execute("nbd-server-start", {"addr": addr})
        for node in self.nodes:
            await self.qsd.execute(
                "block-export-add",
                {"type": "nbd", "id": f"w-{node}", "node-name": node, "name": node,
                 "writable": True},
            )  # fmt: skip
            handle = nbd.NBD()
            handle.set_export_name(node)
            await asyncio.to_thread(handle.connect_unix, str(self.socket))
            self.handles[node] = handle
        return self

    async def __aexit__(self, *exc: object) -> None:
        for handle in self.handles.values():
            await asyncio.to_thread(handle.shutdown)
        self.handles.clear()
        with self.qsd.subscribe(("BLOCK_EXPORT_DELETED",)) as events:
            for node in self.nodes:
                await self.qsd.execute("block-export-del", {"id": f"w-{node}"})
            await asyncio.wait_for(_all_deleted(events, len(self.nodes)), 30)
        await self.qsd.execute("nbd-server-stop")
        self.socket.unlink(missing_ok=True)

    async def write(self, node: str, offset: int, length: int, byte: int) -> None:
        """``length`` bytes of ``byte`` at ``offset``, flushed; ``byte`` 0 writes zeroes."""
        handle = self.handles[node]
        if byte == 0:
            await asyncio.to_thread(handle.zero, length, offset)
        else:
            await asyncio.to_thread(handle.pwrite, bytes([byte]) * length, offset)
        await asyncio.to_thread(handle.flush)


async def _all_deleted(events: EventSubscription, count: int) -> None:
    while count:
        if await events.get(None) is not None:
            count -= 1


def peer_socket_nodelay(pid: int, peer: tuple[str, int]) -> bool | None:
    """Whether process ``pid``'s TCP socket connected to ``peer`` has TCP_NODELAY (None: it has
    no such socket yet), read from a copy of its descriptor (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
                copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                if copy < 0:
                    continue
                with socket.socket(fileno=copy) as sock:
                    tcp = sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX
                    if tcp and sock.getpeername()[:2] == peer:
                        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        os.close(pidfd)
    return None


_SYS_PIDFD_GETFD = 438  # Linux, every architecture
