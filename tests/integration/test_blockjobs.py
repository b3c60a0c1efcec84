"""Replication-cycle block jobs against real QEMU and qemu-storage-daemon processes (TCG)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fault import tmpfs
from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica._internal.drivers.qemu.blockjobs import (
    BITMAP,
    BitmapStatus,
    QmpTarget,
    bitmap_status,
    full_copy_with_tracking,
    incremental_copy,
    remove_bitmaps,
)
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.drivers.qemu.qemu import QemuVm, VmSpec, launch
from vmreplica._internal.drivers.qemu.qmp import EventSubscription
from vmreplica._internal.drivers.qemu.qsd import start_storage_daemon
from vmreplica.errors import InvalidState, ResyncRequired, StorageError, VmrError

MiB = 1 << 20


def _reap(root: Path) -> None:
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
            os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}/cmdline").exists():
            time.sleep(0.02)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    assert len(str(tmp_path / "run-xx" / "qmp.sock")) < 108  # unix socket path limit
    try:
        yield tmp_path
    finally:
        _reap(tmp_path)


def qcow2(path: Path, size: int, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    args += ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run([*args, str(path), str(size)], check=True)
    return path


def offline_write(disk: Path, *commands: str) -> None:
    """Write with the qemu-io tool while no QEMU holds the disk (it keeps bitmaps up to date)."""
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, str(disk)], capture_output=True, text=True, check=True)
    assert "error" not in done.stdout.lower() + done.stderr.lower()


async def start_vm(root: Path, disks: tuple[Path, ...], run: str = "run-vm") -> QemuVm:
    return await launch(VmSpec(str(uuid.uuid4()), "bj", 1, 64, disks, root / run))


async def write(vm: QemuVm, disk: int, command: str) -> None:
    """Write through the guest's virtio device, the path a guest write takes (backup filter)."""
    device = f"/machine/peripheral/vblk{disk}/virtio-backend"
    out = await vm.hmp(f'qemu-io -d {device} "{command}"')
    assert "wrote" in out and "error" not in out.lower() and "fail" not in out.lower(), out


async def new_chains(root: Path, nodes: list[str], full: list[Path]) -> list[ReplicaChain]:
    chains = []
    for node, copy in zip(nodes, full, strict=True):
        chain = await ReplicaChain.create(
            root / f"replica-{node}", await qemu_img.virtual_size(copy)
        )
        assert await chain.apply_delta(copy)
        chains.append(chain)
    return chains


async def leftovers(target: QmpTarget) -> tuple[list[str], list[object]]:
    """Target nodes and jobs a copy left behind (should be none)."""
    nodes = await target.execute("query-named-block-nodes", {"flat": True})
    jobs = await target.execute("query-block-jobs")
    assert isinstance(nodes, list) and isinstance(jobs, list)
    return [n["node-name"] for n in nodes if n["node-name"].startswith("vmr-")], jobs


def data_bytes(extents: list[qemu_img.Extent]) -> int:
    return sum(e.length for e in extents if e.data)


def test_running_vm_full_copy_then_three_incremental_cycles(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 64 * MiB), qcow2(root / "d1.qcow2", 32 * MiB))
    nodes = ["disk0", "disk1"]

    async def scenario() -> None:
        vm = await start_vm(root, disks)
        try:
            await write(vm, 0, "write -P 0x11 0 4M")
            await write(vm, 1, "write -P 0x12 1M 2M")
            calls: list[tuple[int, int]] = []
            full = [root / "full0.qcow2", root / "full1.qcow2"]
            await full_copy_with_tracking(
                vm, nodes, full, progress=lambda d, t: calls.append((d, t))
            )
            assert calls[-1] == (96 * MiB, 96 * MiB)
            assert [s.dirty_bytes for s in await bitmap_status(vm, nodes)] == [0, 0]
            assert [await qemu_img.bitmaps(f) for f in full] == [[], []]  # copies carry none
            chains = await new_chains(root, nodes, full)
            for cycle in range(3):
                base = (8 + cycle * 8) * MiB
                await write(vm, 0, f"write -P 0x{0x20 + cycle:x} {base} 1M")  # new data
                await write(vm, 0, f"write -P 0x{0x30 + cycle:x} {cycle}M 512k")  # overwrite
                await write(vm, 1, f"write -z {1 + cycle}M 256k")  # zeroing
                statuses = await bitmap_status(vm, nodes)
                assert [s.dirty_bytes for s in statuses] == [1536 * 1024, 256 * 1024]
                assert all(s.present and s.recording and not s.inconsistent for s in statuses)
                deltas = [root / f"c{cycle}-0.qcow2", root / f"c{cycle}-1.qcow2"]
                calls.clear()
                await incremental_copy(
                    vm, nodes, deltas, progress=lambda d, t: calls.append((d, t))
                )
                assert calls[-1] == (1792 * 1024, 1792 * 1024)
                # Exactly the changed clusters; the zeroed range as zero clusters, not data.
                assert data_bytes(await qemu_img.map(deltas[0])) == 1536 * 1024
                zeros = [e for e in await qemu_img.map(deltas[1]) if e.zero and e.present]
                assert data_bytes(await qemu_img.map(deltas[1])) == 0 and zeros
                assert [s.dirty_bytes for s in await bitmap_status(vm, nodes)] == [0, 0]
                for chain, delta in zip(chains, deltas, strict=True):
                    assert await chain.apply_delta(delta)
            assert await leftovers(vm) == ([], [])
        finally:
            await vm.quit()
        for disk, chain in zip(disks, chains, strict=True):
            assert await qemu_img.compare(disk, chain.tip)
            await chain.verify()
        # The clean quit stored the bitmaps, recording, for the next cycle after a restart.
        assert [[(b.name, b.in_use) for b in await qemu_img.bitmaps(d)] for d in disks] == [
            [(BITMAP, False)],
            [(BITMAP, False)],
        ]

    asyncio.run(scenario())


class Interposed:
    """The VM seen through the QmpTarget protocol, with faults a test cannot get otherwise.

    ``pause``: the first copy job is paused the moment the transaction has started it (a copy
    takes a fraction of a second, so this is how a test acts mid-copy). ``fail_first_del``: the
    first ``blockdev-del`` fails, as if the monitor broke right after the copy.
    """

    def __init__(self, vm: QemuVm, *, pause: bool = False, fail_first_del: bool = False) -> None:
        self.vm = vm
        self.pause = pause
        self.fail_del = fail_first_del

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = 60.0
    ) -> object:
        if cmd == "blockdev-del" and self.fail_del:
            self.fail_del = False
            raise VmrError("blockdev-del failed (simulated)")
        result = await self.vm.execute(cmd, args, timeout)
        if cmd == "transaction" and self.pause:
            await self.vm.execute("block-job-pause", {"device": "vmr-j0"})
        return result

    def subscribe(self, names: tuple[str, ...] | None = None) -> EventSubscription:
        return self.vm.subscribe(names)


async def wait_paused(vm: QemuVm, task: asyncio.Task[None]) -> list[dict[str, Any]]:
    """Wait until job vmr-j0 (run by ``task``) has paused; returns its query-block-jobs entry."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = await vm.execute("query-block-jobs")
        assert isinstance(jobs, list) and not task.done()
        if paused := [j for j in jobs if j["device"] == "vmr-j0" and j["status"] == "paused"]:
            return paused
        await asyncio.sleep(0.01)
    raise AssertionError(f"job vmr-j0 did not pause: {jobs}")


def test_writes_during_the_full_copy_are_not_lost(root: Path) -> None:
    disk = qcow2(root / "d0.qcow2", 256 * MiB)
    offline_write(disk, "write -P 0x5a 0 128M", "write -P 0x5b 128M 64M")
    before = root / "before.qcow2"
    shutil.copy(disk, before)

    async def scenario() -> None:
        vm = await start_vm(root, (disk,))
        full = root / "full.qcow2"
        copy = asyncio.create_task(
            full_copy_with_tracking(Interposed(vm, pause=True), ["disk0"], [full])
        )
        try:
            jobs = await wait_paused(vm, copy)
            assert jobs[0]["offset"] < 128 * MiB  # still in the first data region
            # Over data copied already, not yet, and over empty space; then a zeroing.
            await write(vm, 0, "write -P 0xc1 0 1M")
            await write(vm, 0, "write -P 0xc2 150M 1M")
            await write(vm, 0, "write -P 0xc3 200M 2M")
            await write(vm, 0, "write -z 60M 1M")
            await vm.execute("block-job-resume", {"device": "vmr-j0"})
            await copy
            # The copy is the disk as it was when the copy started...
            assert await qemu_img.compare(full, before)
            (status,) = await bitmap_status(vm, ["disk0"])
            assert status.dirty_bytes == 5 * MiB  # ...and every write since is tracked.
            (chain,) = await new_chains(root, ["disk0"], [full])
            delta = root / "delta.qcow2"
            await incremental_copy(vm, ["disk0"], [delta])
            await chain.apply_delta(delta)
        finally:
            copy.cancel()
            with contextlib.suppress(BaseException):
                await copy
            await vm.quit()
        assert await qemu_img.compare(disk, chain.tip)
        assert not await qemu_img.compare(disk, before)

    asyncio.run(scenario())


def test_storage_daemon_bitmap_persists_across_restarts(root: Path) -> None:
    disk = qcow2(root / "d0.qcow2", 32 * MiB)
    offline_write(disk, "write -P 0x33 0 3M")

    async def scenario() -> None:
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            await full_copy_with_tracking(qsd, ["disk0"], [root / "full.qcow2"])
            assert await leftovers(qsd) == ([], [])
        finally:
            await qsd.stop()
        (bitmap,) = await qemu_img.bitmaps(disk)
        assert bitmap.name == BITMAP and bitmap.flags == {"auto"}
        (chain,) = await new_chains(root, ["disk0"], [root / "full.qcow2"])
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            assert await bitmap_status(qsd, ["disk0"]) == [
                BitmapStatus("disk0", True, False, True, 0)
            ]
        finally:
            await qsd.stop()
        vm = await start_vm(root, (disk,))
        try:
            await write(vm, 0, "write -P 0x44 2M 2M")
        finally:
            await vm.quit()
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            expected = BitmapStatus("disk0", True, False, True, 2 * MiB)
            assert await bitmap_status(qsd, ["disk0"]) == [expected]
            await incremental_copy(qsd, ["disk0"], [root / "delta.qcow2"], job_prefix="vm7")
            assert (await bitmap_status(qsd, ["disk0"]))[0].dirty_bytes == 0
        finally:
            await qsd.stop()
        await chain.apply_delta(root / "delta.qcow2")
        assert await qemu_img.compare(disk, chain.tip)

    asyncio.run(scenario())


def test_kill_9_makes_the_bitmap_inconsistent_and_requires_resync(root: Path) -> None:
    disk = qcow2(root / "d0.qcow2", 32 * MiB)
    offline_write(disk, "write -P 0x33 0 1M")

    async def scenario() -> None:
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            await full_copy_with_tracking(qsd, ["disk0"], [root / "full.qcow2"])
        finally:
            await qsd.stop()  # stored cleanly once
        qsd = await start_storage_daemon((disk,), root / "qsd")
        await qsd.kill()  # reopened, then killed with the bitmap marked in-use
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            (status,) = await bitmap_status(qsd, ["disk0"])
            assert status.present and status.inconsistent and not status.recording
            delta = root / "delta.qcow2"
            with pytest.raises(ResyncRequired, match=r"change tracking of disk0 was lost \("):
                await incremental_copy(qsd, ["disk0"], [delta])
            assert not delta.exists()
            # Starting over replaces the inconsistent bitmap.
            await full_copy_with_tracking(qsd, ["disk0"], [root / "full2.qcow2"])
            ok = BitmapStatus("disk0", True, False, True, 0)
            assert await bitmap_status(qsd, ["disk0"]) == [ok]
        finally:
            await qsd.stop()
        assert await qemu_img.compare(disk, root / "full2.qcow2")

    asyncio.run(scenario())


def test_bitmap_never_stored_is_missing_after_kill_and_requires_resync(root: Path) -> None:
    disk = qcow2(root / "d0.qcow2", 32 * MiB)

    async def scenario() -> None:
        vm = await start_vm(root, (disk,))
        await full_copy_with_tracking(vm, ["disk0"], [root / "full.qcow2"])
        await write(vm, 0, "write -P 0x1 0 64k")
        await vm.kill()
        qsd = await start_storage_daemon((disk,), root / "qsd")
        try:
            assert not (await bitmap_status(qsd, ["disk0"]))[0].present
            with pytest.raises(ResyncRequired, match="missing"):
                await incremental_copy(qsd, ["disk0"], [root / "delta.qcow2"])
            await remove_bitmaps(qsd, ["disk0"])  # absent: nothing to do, no error
        finally:
            await qsd.stop()

    asyncio.run(scenario())


def test_grouped_incremental_failure_keeps_every_change_for_the_retry(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 32 * MiB), qcow2(root / "d1.qcow2", 32 * MiB))
    nodes = ["disk0", "disk1"]
    full = [root / "full0.qcow2", root / "full1.qcow2"]

    async def scenario() -> None:
        vm = await start_vm(root, disks)
        try:
            await write(vm, 0, "write -P 0x10 0 1M")
            await write(vm, 1, "write -P 0x11 0 1M")
            await full_copy_with_tracking(vm, nodes, full)
            chains = await new_chains(root, nodes, full)
            await write(vm, 0, "write -P 0x20 4M 1M")
            await write(vm, 1, "write -P 0x21 4M 4M")  # more than the small disk holds
            failed = [root / "f0.qcow2", root / "small" / "f1.qcow2"]
            with tmpfs(root / "small", "1M"), pytest.raises(StorageError, match="disk full"):
                await incremental_copy(vm, nodes, failed)
            assert not any(f.exists() for f in failed)
            assert await leftovers(vm) == ([], [])
            statuses = await bitmap_status(vm, nodes)
            assert [s.dirty_bytes for s in statuses] == [1 * MiB, 4 * MiB]  # nothing cleared
            await write(vm, 0, "write -P 0x30 8M 1M")  # writes between failure and retry
            await write(vm, 1, "write -z 5M 1M")
            deltas = [root / "r0.qcow2", root / "r1.qcow2"]
            with pytest.raises(InvalidState, match="already exists"):
                await incremental_copy(vm, nodes, [deltas[0], full[0].with_name("d1.qcow2")])
            await incremental_copy(vm, nodes, deltas)
            for chain, delta in zip(chains, deltas, strict=True):
                await chain.apply_delta(delta)
        finally:
            await vm.quit()
        for disk, chain in zip(disks, chains, strict=True):
            assert await qemu_img.compare(disk, chain.tip)

    asyncio.run(scenario())


def test_failed_full_copy_leaves_no_bitmap_and_no_files(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 32 * MiB), qcow2(root / "d1.qcow2", 32 * MiB))
    nodes = ["disk0", "disk1"]

    async def scenario() -> None:
        vm = await start_vm(root, disks)
        try:
            await write(vm, 1, "write -P 0x21 0 4M")
            dests = [root / "f0.qcow2", root / "small" / "f1.qcow2"]
            with tmpfs(root / "small", "1M"), pytest.raises(StorageError, match="disk1"):
                await full_copy_with_tracking(vm, nodes, dests)
            assert not any(d.exists() for d in dests)
            assert [s.present for s in await bitmap_status(vm, nodes)] == [False, False]
            assert await leftovers(vm) == ([], [])
            retry = [root / "g0.qcow2", root / "g1.qcow2"]
            await full_copy_with_tracking(vm, nodes, retry)
            assert [s.present for s in await bitmap_status(vm, nodes)] == [True, True]
        finally:
            await vm.quit()
        for disk, copy in zip(disks, retry, strict=True):
            assert await qemu_img.compare(disk, copy)

    asyncio.run(scenario())


def test_differencing_disk_is_copied_complete_and_sparse(root: Path) -> None:
    parent = qcow2(root / "parent.qcow2", 1024 * MiB)
    offline_write(parent, "write -P 0x61 0 4M", "write -P 0x62 512M 2M")
    child = qcow2(root / "child.qcow2", 1024 * MiB, backing=parent)
    offline_write(child, "write -P 0x71 1M 1M", "write -z 512M 1M")

    async def scenario() -> None:
        qsd = await start_storage_daemon((child,), root / "qsd")
        full = root / "full.qcow2"
        try:
            await full_copy_with_tracking(qsd, ["disk0"], [full])
        finally:
            await qsd.stop()
        info = await qemu_img.info(full)
        assert "backing-filename" not in info and info["virtual-size"] == 1024 * MiB
        assert await qemu_img.compare(child, full)
        # Only the 5 MiB of data the chain reads as non-zero is allocated.
        assert data_bytes(await qemu_img.map(full)) == 5 * MiB
        assert full.stat().st_blocks * 512 < 8 * MiB

    asyncio.run(scenario())


def test_cancelled_incremental_copy_cleans_up_and_keeps_the_changes(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 64 * MiB), qcow2(root / "d1.qcow2", 32 * MiB))
    nodes = ["disk0", "disk1"]
    full = [root / "full0.qcow2", root / "full1.qcow2"]

    async def scenario() -> None:
        vm = await start_vm(root, disks)
        try:
            await full_copy_with_tracking(vm, nodes, full)
            chains = await new_chains(root, nodes, full)
            await write(vm, 0, "write -P 0x40 0 32M")
            await write(vm, 1, "write -P 0x41 0 1M")
            deltas = [root / "c0.qcow2", root / "c1.qcow2"]
            copy = asyncio.create_task(incremental_copy(Interposed(vm, pause=True), nodes, deltas))
            await wait_paused(vm, copy)
            copy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await copy
            assert await leftovers(vm) == ([], [])
            assert not any(d.exists() for d in deltas)
            assert [s.dirty_bytes for s in await bitmap_status(vm, nodes)] == [32 * MiB, MiB]
            await incremental_copy(vm, nodes, deltas)
            for chain, delta in zip(chains, deltas, strict=True):
                await chain.apply_delta(delta)
        finally:
            await vm.quit()
        for disk, chain in zip(disks, chains, strict=True):
            assert await qemu_img.compare(disk, chain.tip)

    asyncio.run(scenario())


def test_delta_lost_after_the_bitmap_was_cleared_forces_a_resync(root: Path) -> None:
    disk = qcow2(root / "d0.qcow2", 32 * MiB)

    async def scenario() -> None:
        vm = await start_vm(root, (disk,))
        try:
            await full_copy_with_tracking(vm, ["disk0"], [root / "full.qcow2"])
            await write(vm, 0, "write -P 0x40 0 1M")
            delta = root / "delta.qcow2"
            failing = Interposed(vm, fail_first_del=True)
            with pytest.raises(ResyncRequired, match="simulated"):
                await incremental_copy(failing, ["disk0"], [delta])
            assert not delta.exists() and await leftovers(vm) == ([], [])
            # The bitmap was cleared by the job: it is dropped rather than trusted again.
            assert not (await bitmap_status(vm, ["disk0"]))[0].present
            with pytest.raises(ResyncRequired, match="missing"):
                await incremental_copy(vm, ["disk0"], [delta])
        finally:
            await vm.quit()

    asyncio.run(scenario())
