"""Deltas of small writes cut down to the guest's own 4 KiB blocks (drivers/qemu/compact.py),
against a real qemu-storage-daemon: exactly the blocks written travel, zeros stay zero clusters,
the replica ends equal to the disk, and a rewrite that fails ships the delta as cut."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from tests.integration.qsd_tools import (
    CLUSTER,
    KiB,
    MiB,
    NbdWriter,
    add_bitmap,
    cluster_size,
    daemon,
    leftovers,
    live_bitmaps,
    mapped,
    qcow2,
    qemu_io,
)
from vmreplica._internal.drivers.qemu import compact, qemu_img, tracking
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon

NODES = ["disk0"]
G1, G2 = tracking.name(1), tracking.name(2)


def prefilled(root: Path) -> tuple[Path, Path]:
    """A 64 MiB disk full of data under generation 1, and the replica's copy of it."""
    disk = qcow2(root / "disk.qcow2", 64 * MiB)
    qemu_io(disk, "write -P 0x11 0 64M")
    replica = root / "replica.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(replica)], check=True)
    add_bitmap(disk, G1)
    return disk, replica


async def second_generation(qsd: StorageDaemon, root: Path) -> None:
    """Generation 1 (made by qemu-img, 64 KiB) committed empty; 2 records 4 KiB blocks."""
    await tracking.settle(qsd, NODES, 1)
    await tracking.rotate(qsd, NODES, 1, [root / "empty.qcow2"])
    await tracking.drop(qsd, NODES, 1)
    await tracking.settle(qsd, NODES, 2)


def apply(delta: Path, replica: Path) -> None:
    """What the replica's chain does with a delta: point it at tip, commit it."""
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-b", str(replica), "-F", "qcow2", str(delta)], check=True
    )
    subprocess.run(["qemu-img", "commit", "-q", "-d", str(delta)], check=True)


def equal(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def test_small_writes_travel_as_their_own_blocks_and_the_replica_ends_equal(root: Path) -> None:
    disk, replica = prefilled(root)
    delta = root / "delta.qcow2"
    blocks = [(3 * MiB + 8 * KiB, 0xA1), (17 * MiB, 0xA2), (40 * MiB + 60 * KiB, 0xA3)]
    zeroed = 50 * MiB + 4 * KiB  # zeros over data: must arrive as a zero cluster

    async def scenario() -> int:
        async with daemon([disk], root / "qsd") as qsd:
            await second_generation(qsd, root)
            async with NbdWriter(qsd, root / "w.sock", NODES) as w:
                for offset, byte in blocks:
                    await w.write("disk0", offset, 4 * KiB, byte)
                await w.write("disk0", zeroed, 4 * KiB, 0)
            copied = await tracking.rotate(qsd, NODES, 2, [delta])
            assert copied == [4 * CLUSTER]
            saved = await compact.compact(qsd, NODES, 2, [delta], copied, root / "n.sock")
            # The generation stays until the engine commits the delta: a crash now loses nothing.
            assert (await live_bitmaps(qsd))[G2].count == 16 * KiB
            assert await leftovers(qsd) == ([], [])
            return saved

    saved = asyncio.run(scenario())
    assert saved == 4 * CLUSTER - 16 * KiB
    assert cluster_size(delta) == 4 * KiB
    assert mapped(delta) == (sorted((o, 4 * KiB) for o, _ in blocks), [(zeroed, 4 * KiB)])
    assert not list(root.glob("*.fine"))
    assert asyncio.run(qemu_img.check(delta)) is None
    apply(delta, replica)
    assert equal(replica, disk)


def test_a_sequential_write_is_shipped_as_cut(root: Path) -> None:
    disk, replica = prefilled(root)
    delta = root / "delta.qcow2"

    async def scenario() -> int:
        async with daemon([disk], root / "qsd") as qsd:
            await second_generation(qsd, root)
            async with NbdWriter(qsd, root / "w.sock", NODES) as w:
                await w.write("disk0", 5 * MiB, 1 * MiB, 0xB1)
                await w.write("disk0", 9 * MiB, 40 * KiB, 0xB2)  # most of one cluster
            copied = await tracking.rotate(qsd, NODES, 2, [delta])
            return await compact.compact(qsd, NODES, 2, [delta], copied, root / "n.sock")

    assert asyncio.run(scenario()) == 0
    assert cluster_size(delta) == CLUSTER
    apply(delta, replica)
    assert equal(replica, disk)


def test_a_rewrite_that_fails_ships_the_delta_as_cut_and_leaves_nothing(root: Path) -> None:
    disk, replica = prefilled(root)
    delta = root / "delta.qcow2"

    async def scenario() -> int:
        async with daemon([disk], root / "qsd") as qsd:
            await second_generation(qsd, root)
            async with NbdWriter(qsd, root / "w.sock", NODES) as w:
                await w.write("disk0", 2 * MiB, 4 * KiB, 0xC1)
            copied = await tracking.rotate(qsd, NODES, 2, [delta])
            # The NBD server the rewrite needs cannot start: its socket's directory is missing.
            saved = await compact.compact(qsd, NODES, 2, [delta], copied, root / "no" / "n.sock")
            assert (await live_bitmaps(qsd))[G2].count == 4 * KiB
            assert await leftovers(qsd) == ([], [])
            return saved

    assert asyncio.run(scenario()) == 0
    assert cluster_size(delta) == CLUSTER
    assert not list(root.glob("*.fine"))
    assert asyncio.run(qemu_img.check(delta)) is None
    apply(delta, replica)
    assert equal(replica, disk)


def test_worth_it_only_when_the_blocks_are_at_most_half_of_what_was_copied() -> None:
    assert compact.worth_it(4 * KiB, CLUSTER)
    assert compact.worth_it(CLUSTER // 2, CLUSTER)
    assert not compact.worth_it(CLUSTER // 2 + 4 * KiB, CLUSTER)
    assert not compact.worth_it(0, 0)
    assert not compact.worth_it(0, CLUSTER)


def test_a_compaction_killed_midway_leaves_nothing_that_stops_the_next_cycle(root: Path) -> None:
    """A killed agent leaves its NBD server, the export of the frozen bitmap (which keeps the
    bitmap busy: no merge, no enable) and the delta's node in the VM's QEMU, which outlives it.
    The next cycle's settle clears them, and compacts again."""
    disk, replica = prefilled(root)
    cut, again = root / "cut.qcow2", root / "again.qcow2"
    socket = root / "dead.sock"

    async def scenario() -> int:
        async with daemon([disk], root / "qsd") as qsd:
            await second_generation(qsd, root)
            async with NbdWriter(qsd, root / "w.sock", NODES) as w:
                await w.write("disk0", 6 * MiB, 4 * KiB, 0xD1)
            await tracking.rotate(qsd, NODES, 2, [cut])
            # What the dead agent left, as compact.py makes it.
            await qsd.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket)}}}
            )
            file = {"driver": "file", "node-name": "vmr-coarse-file", "filename": str(cut)}
            await qsd.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": "vmr-coarse", "file": file, "read-only": True},
            )
            for node, bitmap in (("disk0", [G2]), ("vmr-coarse", [])):
                await qsd.execute("block-export-add", {
                    "type": "nbd", "id": f"vmr-nbd-{node}", "node-name": node,
                    "name": f"vmr-nbd-{node}", "writable": False, "bitmaps": bitmap,
                })  # fmt: skip
            # The cycle never committed: the next one settles generation 2 again.
            await tracking.settle(qsd, NODES, 2)
            assert await qsd.execute("query-block-exports") == []
            assert await leftovers(qsd) == ([], [])
            assert (await live_bitmaps(qsd))[G2].count == 4 * KiB
            copied = await tracking.rotate(qsd, NODES, 2, [again])
            return await compact.compact(qsd, NODES, 2, [again], copied, root / "n.sock")

    assert asyncio.run(scenario()) == CLUSTER - 4 * KiB
    assert cluster_size(again) == 4 * KiB
    apply(again, replica)
    assert equal(replica, disk)
