"""Dirty ranges and range copies over a real qemu-storage-daemon's NBD server."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

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
)
from vmreplica._internal.drivers.qemu.nbd_extents import copy_ranges, dirty_extents
from vmreplica._internal.drivers.qemu.qsd import StorageDaemon
from vmreplica.errors import VmrError

BITMAP = "vmreplica-1"


async def no_exports(qsd: StorageDaemon, socket: Path) -> bool:
    """Nothing left of an NBD server: a new one can start, as the next call needs."""
    exports = await qsd.execute("query-block-exports")
    return exports == [] and not socket.exists() and await leftovers(qsd) == ([], [])


def test_dirty_extents_of_a_recording_bitmap_are_its_clusters_merged(root: Path) -> None:
    # disk1 is read in more than one block status request (each below 4 GiB, so 1 GiB here).
    disks = (qcow2(root / "d0.qcow2", 64 * MiB), qcow2(root / "d1.qcow2", 2048 * MiB))
    add_bitmap(disks[0], BITMAP)
    add_bitmap(disks[1], BITMAP, granularity=256 * KiB)
    nodes = ["disk0", "disk1"]
    socket = root / "nbd.sock"

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 1 * MiB, 64 * KiB, 0xA1)
                await w.write("disk0", 1 * MiB + 64 * KiB, 64 * KiB, 0xA2)  # adjacent
                await w.write("disk0", 10 * MiB + 100, 10, 0xA3)
                await w.write("disk0", 20 * MiB, 64 * KiB, 0)  # zeroes are writes too
                await w.write("disk0", 64 * MiB - 1, 1, 0xA4)  # the last byte
                await w.write("disk1", 300 * KiB, 4 * KiB, 0xB1)
                await w.write("disk1", 600 * KiB, 4 * KiB, 0xB2)
                await w.write("disk1", 1024 * MiB - 4 * KiB, 8 * KiB, 0xB3)  # across requests
            assert await dirty_extents(qsd, nodes, BITMAP, socket) == [
                [(1 * MiB, 128 * KiB), (10 * MiB, CLUSTER), (20 * MiB, CLUSTER),
                 (64 * MiB - CLUSTER, CLUSTER)],
                [(256 * KiB, 512 * KiB), (1024 * MiB - 256 * KiB, 512 * KiB)],
            ]  # fmt: skip
            assert await no_exports(qsd, socket)
            # Recording again, with nothing cleared, and what it records is read next time.
            assert await live_bitmaps(qsd, "disk0") == {BITMAP: Live(True, 320 * KiB)}
            assert await live_bitmaps(qsd, "disk1") == {BITMAP: Live(True, 1 * MiB)}
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 30 * MiB, 64 * KiB, 0xA5)
            assert (await dirty_extents(qsd, nodes, BITMAP, socket))[0] == [
                (1 * MiB, 128 * KiB), (10 * MiB, CLUSTER), (20 * MiB, CLUSTER),
                (30 * MiB, CLUSTER), (64 * MiB - CLUSTER, CLUSTER),
            ]  # fmt: skip
            assert await live_bitmaps(qsd, "disk0") == {BITMAP: Live(True, 384 * KiB)}

    asyncio.run(scenario())


def test_dirty_extents_of_a_disabled_bitmap_leave_it_disabled(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 64 * MiB), qcow2(root / "d1.qcow2", 64 * MiB))
    for disk in disks:
        add_bitmap(disk, BITMAP)
    nodes = ["disk0", "disk1"]
    socket = root / "nbd.sock"

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 4 * MiB, 192 * KiB, 0xA1)
                # A cut generation, as failover reads it: no longer recording.
                await qsd.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": BITMAP})
                await w.write("disk0", 8 * MiB, 64 * KiB, 0xA2)
            assert await dirty_extents(qsd, nodes, BITMAP, socket) == [[(4 * MiB, 192 * KiB)], []]
            assert await no_exports(qsd, socket)
            assert await live_bitmaps(qsd, "disk0") == {BITMAP: Live(False, 192 * KiB)}
            assert await live_bitmaps(qsd, "disk1") == {BITMAP: Live(True, 0)}
            async with NbdWriter(qsd, root / "w.sock", nodes) as w:
                await w.write("disk0", 12 * MiB, 64 * KiB, 0xA3)
            assert await live_bitmaps(qsd, "disk0") == {BITMAP: Live(False, 192 * KiB)}

    asyncio.run(scenario())


def test_an_empty_bitmap_has_no_dirty_extents_whatever_the_disk_holds(root: Path) -> None:
    disks = (qcow2(root / "d0.qcow2", 64 * MiB), qcow2(root / "d1.qcow2", 64 * MiB))
    qemu_io(disks[0], "write -P 0xa1 0 4M")  # before tracking started
    for disk in disks:
        add_bitmap(disk, BITMAP)
    socket = root / "nbd.sock"

    async def scenario() -> None:
        async with daemon(disks, root / "qsd") as qsd:
            assert await dirty_extents(qsd, ["disk0", "disk1"], BITMAP, socket) == [[], []]
            with pytest.raises(VmrError, match="nope"):
                await dirty_extents(qsd, ["disk0"], "nope", socket)
            assert await no_exports(qsd, socket)
            assert await dirty_extents(qsd, ["disk1"], BITMAP, socket) == [[]]

    asyncio.run(scenario())


def test_copy_ranges_copies_whole_clusters_in_place_and_zeros_as_zero_clusters(
    root: Path,
) -> None:
    sources = (qcow2(root / "s0.qcow2", 64 * MiB), qcow2(root / "s1.qcow2", 64 * MiB))
    qemu_io(
        sources[0],
        "write -P 0xa1 0 192k",
        "write -P 0xa2 2052k 60k",  # the last 60 KiB of the cluster at 2 MiB
        "write -P 0xa3 8M 1M",  # then 1 MiB never written: zeros
        "write -P 0xa4 10M 4M",
        "write -P 0xa5 65472k 64k",  # the last cluster
    )
    qemu_io(sources[1], "write -P 0xb1 0 1M")
    dests = (qcow2(root / "c0.qcow2", 64 * MiB), qcow2(root / "c1.qcow2", 64 * MiB))
    qemu_io(dests[0], "write -P 0x77 4M 64k")  # a range not copied: it must stay
    untouched = mapped(dests[1])
    socket = root / "nbd.sock"
    ranges = [
        (64 * KiB, 64 * KiB),
        (1 * MiB + 10, 100),  # reads as zeros
        (2 * MiB + 4 * KiB + 1, 10),
        (8 * MiB, 6 * MiB),  # more than one request, data and zeros mixed
        (64 * MiB - 10, 100),  # past the end
    ]

    async def scenario() -> None:
        async with daemon(sources, root / "qsd") as qsd:
            nodes = ["disk0", "disk1"]
            assert await copy_ranges(qsd, nodes, dests, {}, socket) == 0
            assert await copy_ranges(qsd, nodes, dests, {0: [], 1: []}, socket) == 0
            copied = await copy_ranges(qsd, nodes, dests, {0: ranges}, socket)
            assert copied == 4 * CLUSTER + 6 * MiB
            assert await no_exports(qsd, socket)
            # Closed: a reader would not get the image's lock otherwise.
            assert_reads(dests[0], (64 * KiB, CLUSTER, 0xA1))

    asyncio.run(scenario())
    assert mapped(dests[0]) == (
        [(64 * KiB, CLUSTER), (2 * MiB, CLUSTER), (4 * MiB, CLUSTER), (8 * MiB, 1 * MiB),
         (10 * MiB, 4 * MiB), (64 * MiB - CLUSTER, CLUSTER)],
        [(1 * MiB, CLUSTER), (9 * MiB, 1 * MiB)],
    )  # fmt: skip
    assert mapped(dests[1]) == untouched
    # Over a replica that has other data everywhere, only the copied clusters show.
    other = qcow2(root / "other.qcow2", 64 * MiB)
    qemu_io(other, "write -P 0xee 0 16M", "write -P 0xee 63M 1M")
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(other), str(dests[0])],
        check=True,
    )
    assert_reads(
        dests[0],
        (0, 64 * KiB, 0xEE),
        (64 * KiB, CLUSTER, 0xA1),
        (128 * KiB, 64 * KiB, 0xEE),  # the source's data there was not asked for
        (1 * MiB, CLUSTER, 0),
        (1 * MiB + CLUSTER, 64 * KiB, 0xEE),
        (2 * MiB, 4 * KiB, 0),  # the rest of a cluster comes with it, zeros included
        (2 * MiB + 4 * KiB, 60 * KiB, 0xA2),
        (4 * MiB, CLUSTER, 0x77),
        (8 * MiB, 1 * MiB, 0xA3),
        (9 * MiB, 1 * MiB, 0),
        (10 * MiB, 4 * MiB, 0xA4),
        (14 * MiB, 64 * KiB, 0xEE),
        (63 * MiB, 1 * MiB - CLUSTER, 0xEE),
        (64 * MiB - CLUSTER, CLUSTER, 0xA5),
    )
