"""Block hashes over NBD, of an image file (through a qemu-nbd libnbd starts) and of a
point-in-time export: the same content hashes the same, zeros hash to None unread, and one block
changed changes exactly one hash."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import blake3
import pytest

from vmreplica._internal.drivers.qemu import nbd_copy
from vmreplica._internal.drivers.qemu.block_hash import (
    copy_blocks,
    hash_blocks,
    hash_view,
    with_layout,
)
from vmreplica._internal.drivers.qemu.block_read import NbdView
from vmreplica._internal.drivers.qemu.qsd import node_name, start_storage_daemon

KiB = 1024
BLOCK = 64 * KiB


def qcow2(path: Path, size: str, *writes: str, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), size], check=True)
    for write in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(path)], check=True,
                       capture_output=True)  # fmt: skip
    return path


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


def test_image_blocks_hash_their_content_and_zeros_hash_to_none(tmp_path: Path) -> None:
    image = qcow2(
        tmp_path / "a.qcow2", "1M",
        "write -P 0xab 0 64k",  # block 0: data
        "write -z 128k 64k",  # block 2: a zero cluster
        "write -P 0x00 192k 64k",  # block 3: allocated, but zeros
        "write -P 0xcd 260k 4k",  # block 4: partly data
    )  # fmt: skip
    hashes = hash_blocks(NbdView(image=image), BLOCK)
    assert len(hashes) == 16
    assert hashes[0] == blake3.blake3(pattern(0xAB, BLOCK)).digest()
    assert hashes[1] is None and hashes[2] is None and hashes[3] is None
    block4 = bytes(4 * KiB) + pattern(0xCD, 4 * KiB) + bytes(BLOCK - 8 * KiB)
    assert hashes[4] == blake3.blake3(block4).digest()
    assert all(h is None for h in hashes[5:])
    assert hash_blocks(NbdView(image=image), BLOCK, first_block=4) == hashes[4:]


def test_a_chain_reads_through_its_backing_and_one_change_is_one_hash(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2", "2M", "write -P 0x11 0 2M")
    tip = qcow2(tmp_path / "tip.qcow2", "2M", "write -P 0x22 1M 4k", backing=base)
    flat = qcow2(tmp_path / "flat.qcow2", "2M", "write -P 0x11 0 2M")
    a, b = hash_blocks(NbdView(image=tip), BLOCK), hash_blocks(NbdView(image=flat), BLOCK)
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    assert differing == [16]  # 1 MiB / 64 KiB


def test_a_point_in_time_export_hashes_as_the_image_did(tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "d.qcow2", "4M", "write -P 0x5a 0 1M", "write -P 0x6b 3M 64k")
    before = hash_blocks(NbdView(image=disk), BLOCK)

    async def through_export() -> list[bytes | None]:
        daemon = await start_storage_daemon((disk,), tmp_path / "run")
        try:
            source = await nbd_copy.export_source(
                daemon, [node_name(0)], tmp_path / "run" / "pit", "vmreplica-1"
            )
            try:
                return await asyncio.to_thread(hash_blocks, source.views[0], BLOCK)
            finally:
                await nbd_copy.close_source(daemon, source)
        finally:
            await daemon.stop()

    assert asyncio.run(through_export()) == before


def test_a_block_size_that_is_not_a_multiple_of_512_is_refused(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2", "1M")
    with pytest.raises(ValueError):
        hash_blocks(NbdView(image=image), 1000)


def test_copied_blocks_are_a_standalone_delta_of_just_those_blocks(tmp_path: Path) -> None:
    source = qcow2(
        tmp_path / "s.qcow2", "1M", "write -P 0xab 0 64k", "write -P 0xcd 128k 64k",
        "write -P 0xef 320k 64k",
    )  # fmt: skip
    dest = qcow2(tmp_path / "d.qcow2", "1M")
    written = copy_blocks(NbdView(image=source), dest, [0, 4, 5], BLOCK)
    assert written == 2 * BLOCK  # block 4 reads as zeros: a zero cluster, not data
    layout = json.loads(
        subprocess.run(["qemu-img", "map", "--output=json", str(dest)], check=True,
                       capture_output=True, text=True).stdout
    )  # fmt: skip
    held = [(e["start"], e["length"], e["data"], e["zero"]) for e in layout if e["present"]]
    assert held == [(0, BLOCK, True, False), (4 * BLOCK, BLOCK, False, True),
                    (5 * BLOCK, BLOCK, True, False)], held  # fmt: skip
    assert "backing" not in subprocess.run(["qemu-img", "info", str(dest)], check=True,
                                           capture_output=True, text=True).stdout  # fmt: skip
    reads = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xef 320k 64k",
         str(dest)], check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in reads


def test_reading_the_files_hashes_exactly_as_nbd_does(tmp_path: Path) -> None:
    """Every kind of run map reports (data in the top and in the backing file, a compressed
    cluster, zero clusters, allocated zeros, holes, a last block shorter than the others),
    across chunk boundaries: the files, read where the layout puts them, hash as NBD reads."""
    size = str(10 * 1024 * KiB + 4 * KiB)
    base = qcow2(
        tmp_path / "base.qcow2", size, "write -P 0x11 0 5M", "write -c -P 0x22 6M 64k",
        "write -z 7M 128k", "write -P 0x00 8M 64k", "write -P 0x33 10M 4k",
    )  # fmt: skip
    tip = qcow2(
        tmp_path / "tip.qcow2", size, "write -P 0x44 4032k 128k", "write -z 1M 64k",
        "write -P 0x55 9M 8k", backing=base,
    )  # fmt: skip

    async def from_files(block_size: int, first: int, count: int | None) -> list[bytes | None]:
        return await hash_view(NbdView(image=tip), block_size, first, count)

    for block_size, first, count in ((BLOCK, 0, None), (1024 * KiB, 0, None), (BLOCK, 60, 70)):
        over_nbd = hash_blocks(NbdView(image=tip), block_size, first, count)
        assert asyncio.run(from_files(block_size, first, count)) == over_nbd, block_size
    hashes = hash_blocks(NbdView(image=tip), BLOCK)
    assert hashes[16] is None and hashes[96] is not None and hashes[128] is None  # 1M, 6M, 8M
    assert hashes[-1] == blake3.blake3(pattern(0x33, 4 * KiB)).digest()


def test_blocks_copied_from_the_files_equal_those_read_over_nbd(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2", "2M", "write -P 0x11 0 1M", "write -c -P 0x66 1M 64k")
    tip = qcow2(tmp_path / "tip.qcow2", "2M", "write -P 0x22 64k 64k", backing=base)
    blocks = [0, 1, 16, 31]  # 31 is a hole

    async def layout_view() -> NbdView:
        return await with_layout(NbdView(image=tip))

    via_nbd, via_files = qcow2(tmp_path / "a.qcow2", "2M"), qcow2(tmp_path / "b.qcow2", "2M")
    assert copy_blocks(NbdView(image=tip), via_nbd, blocks, BLOCK) == 3 * BLOCK
    assert copy_blocks(asyncio.run(layout_view()), via_files, blocks, BLOCK) == 3 * BLOCK
    assert hash_blocks(NbdView(image=via_nbd), BLOCK) == hash_blocks(
        NbdView(image=via_files), BLOCK
    )


def test_a_delta_into_an_empty_chain_holds_only_the_data(tmp_path: Path) -> None:
    """skip_zeros (a compressed initial copy): every block of a range is asked for, runs longer
    than a read (CHUNK) included; zero blocks, allocated or not, are not written at all, and the
    copy equals the source."""
    source = qcow2(
        tmp_path / "s.qcow2", "12M", "write -P 0xab 0 64k", "write -P 0 64k 64k",
        "write -P 0xcd 1M 9M", "write -P 0 6M 64k", "write -P 0xef 12224k 64k",
    )  # fmt: skip
    dest = qcow2(tmp_path / "d.qcow2", "12M")
    blocks = range(12 * 1024 * KiB // BLOCK)
    written = copy_blocks(NbdView(image=source), dest, blocks, BLOCK, skip_zeros=True)
    assert written == (1 + 9 * 16 - 1 + 1) * BLOCK
    layout = json.loads(
        subprocess.run(["qemu-img", "map", "--output=json", str(dest)], check=True,
                       capture_output=True, text=True).stdout
    )  # fmt: skip
    held = [(e["start"], e["length"]) for e in layout if e["present"]]
    assert held == [(0, BLOCK), (1024 * KiB, 5 * 1024 * KiB), (6 * 1024 * KiB + BLOCK,
                    4 * 1024 * KiB - BLOCK), (12224 * KiB, BLOCK)], held  # fmt: skip
    assert subprocess.run(["qemu-img", "compare", str(source), str(dest)]).returncode == 0
