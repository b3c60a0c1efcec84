"""Generations of change tracking against a real qemu-storage-daemon: what each delta holds, and
that no failure, crash or retry loses a write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.fault import tmpfs
from tests.integration.qsd_tools import (
    CLUSTER,
    KiB,
    Live,
    MiB,
    NbdWriter,
    add_bitmap,
    assert_reads,
    daemon,
    leftovers,
    live_bitmaps,
    mapped,
    qcow2,
    qemu_io,
    stored_bitmaps,
)
from vmreplica._internal.drivers.qemu import tracking
from vmreplica._internal.drivers.qemu.qmp import EventSubscription
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon
from vmreplica.errors import InvalidState, ResyncRequired, StorageError, VmrError

G1, G2, G3 = tracking.name(1), tracking.name(2), tracking.name(3)
SLOW = 64 * KiB  # bytes/s: a throttled copy stops after its first MiB for many seconds


def tracked(root: Path, name: str, size: int = 64 * MiB) -> Path:
    """A new disk with generation 1 of tracking, as the engine starts it on an image at rest."""
    disk = qcow2(root / name, size)
    add_bitmap(disk, G1)
    return disk


class Throttled:
    """The daemon as a rotate sees it, with the copies of ``devices`` rate-limited from the start.

    A copy of a few clusters takes a fraction of a second, so this is how a test acts while one
    runs; ``block-job-set-speed`` with 0 lets it finish.
    """

    def __init__(self, qsd: StorageDaemon, devices: tuple[str, ...] = ("disk0", "disk1")) -> None:
        self.qsd = qsd
        self.devices = devices

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = 60.0
    ) -> object:
        if cmd == "transaction" and args is not None:
            actions = args["actions"]
            assert isinstance(actions, list)
            args = {**args, "actions": [self._throttle(action) for action in actions]}
        return await self.qsd.execute(cmd, args, timeout)

    def _throttle(self, action: dict[str, object]) -> dict[str, object]:
        data = action["data"]
        assert isinstance(data, dict)
        if action["type"] != "blockdev-backup" or data["device"] not in self.devices:
            return action
        return {**action, "data": {**data, "speed": SLOW}}

    def subscribe(self, names: tuple[str, ...] | None = None) -> EventSubscription:
        return self.qsd.subscribe(names)


async def running_copy(qsd: StorageDaemon, job: str = "vmr-j0") -> None:
    """Wait until ``job`` runs, and check it has not copied everything yet."""
    for _ in range(500):
        jobs = await qsd.execute("query-block-jobs")
        assert isinstance(jobs, list)
        if found := [j for j in jobs if j["device"] == job]:
            assert found[0]["status"] == "running" and found[0]["offset"] < found[0]["len"]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job} never started")


def test_rotate_cuts_the_writes_before_it_and_later_writes_go_to_the_next_generation(
    root: Path,
) -> None:
    disks = (tracked(root, "d0.qcow2"), qcow2(root / "d1.qcow2", 64 * MiB))
    qemu_io(disks[1], "write -P 0x11 0 1M")  # before tracking: in no delta
    add_bitmap(disks[1], G1)
    nodes = ["disk0", "disk1"]
    cut1 = [root / "c1-0.qcow2", root / "c1-1.qcow2"]
    cut2 = [root / "c2-0.qcow2", root / "c2-1.qcow2"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            await tracking.settle(qsd, nodes, 1)
            calls: list[tuple[int, int]] = []
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 1 * MiB, 64 * KiB, 0xA1)
                await w.write("disk0", 5 * MiB + 100, 1000, 0xA2)  # part of one cluster
                await w.write("disk0", 63 * MiB + 32 * KiB, 64 * KiB, 0xA3)  # across two
                await w.write("disk1", 128 * KiB, 64 * KiB, 0)  # zeroes over old data
                await w.write("disk1", 8 * MiB, 128 * KiB, 0xB1)
                await tracking.rotate(qsd, nodes, 1, cut1, lambda d, t: calls.append((d, t)))
                assert calls[-1] == (448 * KiB, 448 * KiB)
                assert await live_bitmaps(qsd, "disk0") == {
                    G1: Live(False, 256 * KiB),
                    G2: Live(True, 0),
                }
                assert await live_bitmaps(qsd, "disk1") == {
                    G1: Live(False, 192 * KiB),
                    G2: Live(True, 0),
                }
                await w.write("disk0", 1 * MiB + 64 * KiB, 64 * KiB, 0xC1)
                await w.write("disk0", 1 * MiB, 4 * KiB, 0xC2)  # a cluster of the last cut
            # The commit, as the engine makes it: the old generation goes, the next one stays.
            await tracking.drop(qsd, nodes, 1)
            await tracking.settle(qsd, nodes, 2)
            # Generations after the first record 4 KiB blocks (tracking.GRANULARITY).
            assert await live_bitmaps(qsd, "disk0") == {G2: Live(True, 68 * KiB)}
            await tracking.rotate(qsd, nodes, 2, cut2)
            assert await leftovers(qsd) == ([], [])

        # Whole clusters of what was written, and nothing else.
        assert mapped(cut1[0]) == (
            [(1 * MiB, CLUSTER), (5 * MiB, CLUSTER), (63 * MiB, 128 * KiB)],
            [],
        )
        assert_reads(
            cut1[0],
            (1 * MiB, 64 * KiB, 0xA1),
            (5 * MiB, 100, 0),
            (5 * MiB + 100, 1000, 0xA2),
            (5 * MiB + 1100, CLUSTER - 1100, 0),
            (63 * MiB, 32 * KiB, 0),
            (63 * MiB + 32 * KiB, 64 * KiB, 0xA3),
            (63 * MiB + 96 * KiB, 32 * KiB, 0),
        )
        # Zeroes are a zero cluster, which must shadow the old data once the delta is applied.
        assert mapped(cut1[1]) == ([(8 * MiB, 128 * KiB)], [(128 * KiB, CLUSTER)])
        assert_reads(cut1[1], (8 * MiB, 128 * KiB, 0xB1), (128 * KiB, CLUSTER, 0))
        assert mapped(cut2[0]) == ([(1 * MiB, 128 * KiB)], [])
        assert_reads(
            cut2[0],
            (1 * MiB, 4 * KiB, 0xC2),
            (1 * MiB + 4 * KiB, 60 * KiB, 0xA1),
            (1 * MiB + 64 * KiB, 64 * KiB, 0xC1),
        )
        assert mapped(cut2[1]) == ([], [])
        for disk in disks:
            assert stored_bitmaps(disk) == {G2: set(), G3: {"auto"}}
        for delta in cut1 + cut2:
            assert stored_bitmaps(delta) == {}

    asyncio.run(scenario())


def test_writes_during_the_copy_stay_out_of_the_delta_and_go_to_the_next_generation(
    root: Path,
) -> None:
    disk = tracked(root, "d0.qcow2")
    qemu_io(disk, "write -P 0xa1 0 8M")
    cut1, cut2 = root / "c1.qcow2", root / "c2.qcow2"

    async def scenario() -> None:
        async with daemon([disk], root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", ["disk0"]) as w:
                rotate = asyncio.create_task(tracking.rotate(Throttled(qsd), ["disk0"], 1, [cut1]))
                try:
                    await running_copy(qsd)
                    await w.write("disk0", 7 * MiB, 64 * KiB, 0xB2)  # dirty, not copied yet
                    await w.write("disk0", 30 * MiB, 64 * KiB, 0xB3)  # clean in generation 1
                finally:
                    with contextlib.suppress(VmrError):  # it may be over, if the test failed
                        await qsd.execute("block-job-set-speed", {"device": "vmr-j0", "speed": 0})
                    await rotate
            assert await live_bitmaps(qsd) == {G1: Live(False, 8 * MiB), G2: Live(True, 128 * KiB)}
            await tracking.drop(qsd, ["disk0"], 1)
            await tracking.rotate(qsd, ["disk0"], 2, [cut2])

        # The delta is the disk at the instant of the cut.
        assert mapped(cut1) == ([(0, 8 * MiB)], [])
        assert_reads(cut1, (0, 8 * MiB, 0xA1))
        assert mapped(cut2) == ([(7 * MiB, CLUSTER), (30 * MiB, CLUSTER)], [])
        assert_reads(cut2, (7 * MiB, CLUSTER, 0xB2), (30 * MiB, CLUSTER, 0xB3))

    asyncio.run(scenario())


def test_settle_folds_a_generation_never_committed_back_into_the_committed_one(
    root: Path,
) -> None:
    disk = tracked(root, "d0.qcow2")
    cut = root / "cut.qcow2"

    async def rotate_and_discard(qsd: StorageDaemon) -> None:
        """A cycle that cut its delta and died before the commit: the delta is gone."""
        await tracking.rotate(qsd, ["disk0"], 1, [cut])
        cut.unlink()

    async def first() -> None:
        async with daemon([disk], root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", ["disk0"]) as w:
                await w.write("disk0", 0, 64 * KiB, 0xA1)
            await rotate_and_discard(qsd)

    asyncio.run(first())
    # The clean stop stored both generations, only the new one recording (flag "auto")...
    assert stored_bitmaps(disk) == {G1: set(), G2: {"auto"}}
    qemu_io(disk, "write -P 0xa2 2M 64k")  # ...so this write is in generation 2 only.

    async def second() -> None:
        async with daemon([disk], root / "qsd") as qsd:
            assert await live_bitmaps(qsd) == {G1: Live(False, 64 * KiB), G2: Live(True, 64 * KiB)}
            await tracking.settle(qsd, ["disk0"], 1)
            assert await live_bitmaps(qsd) == {G1: Live(True, 128 * KiB)}
            async with NbdWriter(qsd, root / "w.sock", ["disk0"]) as w:
                await w.write("disk0", 4 * MiB, 64 * KiB, 0xA3)
                await rotate_and_discard(qsd)
                # The same again without a restart: the daemon holds generation 2 in memory.
                await w.write("disk0", 6 * MiB, 64 * KiB, 0xA4)
            assert await live_bitmaps(qsd) == {G1: Live(False, 192 * KiB), G2: Live(True, 64 * KiB)}
            await tracking.settle(qsd, ["disk0"], 1)
            assert await live_bitmaps(qsd) == {G1: Live(True, 256 * KiB)}
            await tracking.settle(qsd, ["disk0"], 1)  # nothing left to do
            assert await live_bitmaps(qsd) == {G1: Live(True, 256 * KiB)}
            await tracking.rotate(qsd, ["disk0"], 1, [cut])

    asyncio.run(second())
    assert mapped(cut) == (
        [(0, CLUSTER), (2 * MiB, CLUSTER), (4 * MiB, CLUSTER), (6 * MiB, CLUSTER)],
        [],
    )
    assert_reads(
        cut,
        (0, CLUSTER, 0xA1),
        (2 * MiB, CLUSTER, 0xA2),
        (4 * MiB, CLUSTER, 0xA3),
        (6 * MiB, CLUSTER, 0xA4),
    )


def test_settle_requires_a_resync_when_the_committed_generation_is_missing(root: Path) -> None:
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    nodes = ["disk0", "disk1"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            with pytest.raises(ResyncRequired, match=rf"disk0 was lost \(bitmap {G2} is missing\)"):
                await tracking.settle(qsd, nodes, 2)
            await tracking.rotate(qsd, nodes, 1, [root / "c0.qcow2", root / "c1.qcow2"])
            await tracking.drop(qsd, nodes, 1)  # committed: generation 2 is the one that counts
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk1", 0, 64 * KiB, 0xA1)
            # Killed: generation 2, added since the images were opened, was never stored.
            await qsd.kill()
        async with daemon(disks, root / "qsd") as qsd:
            assert await live_bitmaps(qsd, "disk1") == {}
            with pytest.raises(ResyncRequired, match=rf"disk0 was lost \(bitmap {G2} is missing\)"):
                await tracking.settle(qsd, nodes, 2)

    asyncio.run(scenario())


def test_settle_requires_a_resync_when_the_bitmap_is_inconsistent(root: Path) -> None:
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    nodes = ["disk0", "disk1"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            await tracking.settle(qsd, nodes, 1)
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 0, 64 * KiB, 0xA1)
            await qsd.kill()  # generation 1 in memory, its bits never stored
        assert stored_bitmaps(disks[0]) == {G1: {"in-use", "auto"}}
        async with daemon(disks, root / "qsd") as qsd:
            assert await live_bitmaps(qsd) == {G1: Live(False, 0, inconsistent=True)}
            with pytest.raises(
                ResyncRequired, match=rf"disk0 was lost \(bitmap {G1} is inconsistent"
            ):
                await tracking.settle(qsd, nodes, 1)
            # What a resynchronization starts with; an inconsistent bitmap can only be removed.
            await tracking.remove_all(qsd, nodes)
            assert await live_bitmaps(qsd) == {}
        assert [stored_bitmaps(d) for d in disks] == [{}, {}]

    asyncio.run(scenario())


def test_drop_removes_only_the_old_generation_and_remove_all_every_generation(root: Path) -> None:
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    foreign = ["backup", "vmreplica", "vmreplica-x", "other-2"]
    for disk in disks:
        for name in foreign:
            add_bitmap(disk, name)
    nodes = ["disk0", "disk1"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 0, 64 * KiB, 0xA1)
                await tracking.rotate(qsd, nodes, 1, [root / "a0.qcow2", root / "a1.qcow2"])
                await w.write("disk0", 1 * MiB, 64 * KiB, 0xA2)
                await tracking.rotate(qsd, nodes, 2, [root / "b0.qcow2", root / "b1.qcow2"])
            others = {name: Live(True, 128 * KiB) for name in foreign}
            assert await live_bitmaps(qsd) == {
                G1: Live(False, 64 * KiB),
                G2: Live(False, 64 * KiB),
                G3: Live(True, 0),
                **others,
            }
            await tracking.drop(qsd, nodes, 1)
            await tracking.drop(qsd, nodes, 1)  # again, as after a crash right after it
            assert await live_bitmaps(qsd) == {
                G2: Live(False, 64 * KiB),
                G3: Live(True, 0),
                **others,
            }
            assert set(await live_bitmaps(qsd, "disk1")) == {G2, G3, *foreign}
            await tracking.remove_all(qsd, nodes)
            assert await live_bitmaps(qsd) == others
            assert set(await live_bitmaps(qsd, "disk1")) == set(foreign)
        assert [stored_bitmaps(d) for d in disks] == [{name: {"auto"} for name in foreign}] * 2

    asyncio.run(scenario())


def test_rotate_refusing_an_existing_file_keeps_every_bit(root: Path) -> None:
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    nodes = ["disk0", "disk1"]
    dests = [root / "c0.qcow2", qcow2(root / "taken.qcow2", MiB)]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 0, 64 * KiB, 0xA1)
                await w.write("disk1", 2 * MiB, 128 * KiB, 0xA2)
            with pytest.raises(InvalidState, match=r"disk1: .*taken\.qcow2 already exists"):
                await tracking.rotate(qsd, nodes, 1, dests)
            assert await live_bitmaps(qsd, "disk0") == {G1: Live(True, 64 * KiB)}
            assert await live_bitmaps(qsd, "disk1") == {G1: Live(True, 128 * KiB)}
            assert await leftovers(qsd) == ([], [])
            assert not dests[0].exists()
            await tracking.rotate(qsd, nodes, 1, [dests[0], root / "c1.qcow2"])
        assert mapped(dests[0]) == ([(0, CLUSTER)], [])
        assert mapped(root / "c1.qcow2") == ([(2 * MiB, 128 * KiB)], [])

    asyncio.run(scenario())


def test_rotate_leaves_a_file_it_refused_to_overwrite_alone(root: Path) -> None:
    disk = tracked(root, "d0.qcow2")
    taken = qcow2(root / "taken.qcow2", MiB)  # could be a disk, or a replica's image
    qemu_io(taken, "write -P 0x77 0 64k")

    async def scenario() -> None:
        async with daemon([disk], root / "qsd") as qsd:
            with pytest.raises(InvalidState, match="already exists"):
                await tracking.rotate(qsd, ["disk0"], 1, [taken])

    asyncio.run(scenario())
    assert taken.exists()
    assert_reads(taken, (0, CLUSTER, 0x77))


def rotate_into_a_full_disk(root: Path) -> tuple[Path, ...]:
    """Disks whose rotate fails on disk1, whose delta does not fit, while disk0's still runs."""
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    qemu_io(disks[0], "write -P 0xa1 0 8M")
    qemu_io(disks[1], "write -P 0xa2 0 4M")  # more than the small file system holds
    return disks


def test_rotate_failing_on_a_full_disk_folds_the_new_generation_back(root: Path) -> None:
    disks = rotate_into_a_full_disk(root)
    nodes = ["disk0", "disk1"]
    dests = [root / "c0.qcow2", root / "small" / "c1.qcow2"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            with tmpfs(root / "small", "1M"):
                with pytest.raises(StorageError, match="failed"):
                    await tracking.rotate(Throttled(qsd, ("disk0",)), nodes, 1, dests)
                assert not any(d.exists() for d in dests)
            assert await leftovers(qsd) == ([], [])  # disk0's copy was cancelled
            assert await live_bitmaps(qsd, "disk0") == {G1: Live(True, 8 * MiB)}
            assert await live_bitmaps(qsd, "disk1") == {G1: Live(True, 4 * MiB)}
            retry = [root / "r0.qcow2", root / "r1.qcow2"]
            await tracking.rotate(qsd, nodes, 1, retry)
        assert mapped(retry[0]) == ([(0, 8 * MiB)], [])
        assert mapped(retry[1]) == ([(0, 4 * MiB)], [])
        assert_reads(retry[1], (0, 4 * MiB, 0xA2))

    asyncio.run(scenario())


def test_rotate_failing_on_a_full_disk_says_which_disk_and_why(root: Path) -> None:
    disks = rotate_into_a_full_disk(root)
    dests = [root / "c0.qcow2", root / "small" / "c1.qcow2"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            with (
                tmpfs(root / "small", "1M"),
                pytest.raises(StorageError, match=r"disk full: copy of disk1 into .*small"),
            ):
                await tracking.rotate(Throttled(qsd, ("disk0",)), ["disk0", "disk1"], 1, dests)

    asyncio.run(scenario())


def test_cancelled_rotate_cleans_up_and_keeps_the_writes_made_during_it(root: Path) -> None:
    disks = (tracked(root, "d0.qcow2"), tracked(root, "d1.qcow2"))
    nodes = ["disk0", "disk1"]
    qemu_io(disks[0], "write -P 0xa1 0 8M")
    qemu_io(disks[1], "write -P 0xa2 0 64k")
    dests = [root / "c0.qcow2", root / "c1.qcow2"]

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                rotate = asyncio.create_task(tracking.rotate(Throttled(qsd), nodes, 1, dests))
                try:
                    await running_copy(qsd)
                    await w.write("disk0", 32 * MiB, 64 * KiB, 0xB1)  # in generation 2
                finally:
                    rotate.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await rotate
            assert await leftovers(qsd) == ([], [])
            assert not any(d.exists() for d in dests)
            assert await live_bitmaps(qsd, "disk0") == {G1: Live(True, 8 * MiB + 64 * KiB)}
            assert await live_bitmaps(qsd, "disk1") == {G1: Live(True, 64 * KiB)}
            await tracking.rotate(qsd, nodes, 1, dests)
        assert mapped(dests[0]) == ([(0, 8 * MiB), (32 * MiB, CLUSTER)], [])
        assert_reads(dests[0], (0, 8 * MiB, 0xA1), (32 * MiB, CLUSTER, 0xB1))
        assert mapped(dests[1]) == ([(0, CLUSTER)], [])

    asyncio.run(scenario())


def test_settle_clears_the_copy_a_dead_agent_left_running(root: Path) -> None:
    disk = tracked(root, "d0.qcow2")
    qemu_io(disk, "write -P 0xa1 0 8M")
    orphan = qcow2(root / "orphan.qcow2", 64 * MiB)

    async def scenario() -> None:
        async with (
            daemon([disk], root / "qsd") as qsd,
            NbdWriter(qsd, root / "w.sock", ["disk0"]) as w,
        ):
            # What rotate had started when its agent died; the QEMU (a running VM's) lives on.
            file = {"driver": "file", "node-name": "vmr-t0-file", "filename": str(orphan)}
            await qsd.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": "vmr-t0", "file": file}
            )
            await qsd.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": G2, "persistent": True}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": G1}},
                {"type": "blockdev-backup", "data": {
                    "job-id": "vmr-j0", "device": "disk0", "target": "vmr-t0", "sync": "bitmap",
                    "bitmap": G1, "bitmap-mode": "never", "speed": SLOW,
                }},
            ]})  # fmt: skip
            await running_copy(qsd)
            await w.write("disk0", 40 * MiB, 64 * KiB, 0xB1)
            await tracking.settle(qsd, ["disk0"], 1)
            assert await leftovers(qsd) == ([], [])
            assert await live_bitmaps(qsd) == {G1: Live(True, 8 * MiB + 64 * KiB)}

    asyncio.run(scenario())


def test_start_from_top_copies_the_overlay_only_and_starts_generation_one(root: Path) -> None:
    base = qcow2(root / "base.qcow2", 64 * MiB)
    qemu_io(base, "write -P 0x11 0 4M")
    top = qcow2(root / "top.qcow2", 64 * MiB, backing=base)
    qemu_io(top, "write -P 0x22 1M 64k", "write -z 2M 64k")
    for name in (G3, "backup"):
        add_bitmap(top, name)
    cut = root / "cut.qcow2"

    async def scenario() -> None:
        async with daemon([top], root / "qsd") as qsd:
            await tracking.start_from_top(qsd, ["disk0"], [cut])
            assert await live_bitmaps(qsd) == {G1: Live(True, 0), "backup": Live(True, 0)}
            async with NbdWriter(qsd, root / "w.sock", ["disk0"]) as w:
                await w.write("disk0", 3 * MiB, 64 * KiB, 0x33)
            assert await live_bitmaps(qsd) == {
                G1: Live(True, CLUSTER),
                "backup": Live(True, CLUSTER),
            }
            assert await leftovers(qsd) == ([], [])

    asyncio.run(scenario())
    assert mapped(cut) == ([(1 * MiB, CLUSTER)], [(2 * MiB, CLUSTER)])
    assert_reads(cut, (1 * MiB, CLUSTER, 0x22), (2 * MiB, CLUSTER, 0))
