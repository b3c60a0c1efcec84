"""A compressed delta's disks travel as one zstd frame per piece: raw zstd blocks, made without
the compressor, for a piece whose samples do not compress; and a stream of one frame per disk,
as senders before it made, is still received."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard

from vmreplica._internal.transport import delta
from vmreplica._internal.transport.delta import CHUNK, MAGIC, build_manifest, iter_stream
from vmreplica._internal.transport.delta_receive import receive

VM = "vm-0001"


def text_like(n: int, seed: int = 3) -> bytes:
    r = random.Random(seed)
    words = [b"kernel:", b"eth0", b"link", b"up", b"systemd[1]:", b"Started", b"session"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(32)) + b" id=%x\n" % r.getrandbits(48)
    return bytes(out[:n])


def frames_of(wire: bytes) -> list[list[bytes]]:
    """Per disk, the payload of each block (one frame each, as this sender makes them)."""
    (n,) = struct.unpack(">I", wire[len(MAGIC) : len(MAGIC) + 4])
    at, disks, blocks = len(MAGIC) + 4 + n, [], list[bytes]()
    while at < len(wire):
        (size,) = struct.unpack(">I", wire[at : at + 4])
        at += 4
        if not size:
            disks.append(blocks)
            blocks = []
            continue
        blocks.append(wire[at : at + size])
        at += size
    return disks


def pack(d: Path) -> tuple[bytes, delta.DeltaManifest]:
    async def run() -> tuple[bytes, delta.DeltaManifest]:
        m = await build_manifest(d, VM, 3, "CrashConsistent", "zstd")
        return b"".join([piece async for piece in iter_stream(d, m)]), m

    return asyncio.run(run())


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for off in range(0, len(data), size):
        yield data[off : off + size]


def unpack(wire: bytes, stage: Path) -> delta.DeltaManifest:
    return asyncio.run(receive(chunked(wire, 100_000), stage, expected_vm_id=VM))


def is_raw(frame: bytes) -> bool:
    return frame.startswith(delta._RAW_HEAD)


@pytest.mark.parametrize("size", [1, 5, delta.RAW_BLOCK - 1, delta.RAW_BLOCK, delta.RAW_BLOCK + 1,
                                  CHUNK])  # fmt: skip
def test_a_raw_frame_is_read_by_the_zstd_decoder(size: int) -> None:
    data = random.Random(size).randbytes(size)
    framed = delta.raw_frame(data)
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4
    assert len(framed) <= size + 4 + 6 + 3 * (size // delta.RAW_BLOCK + 1)
    decoded = zstandard.ZstdDecompressor().decompressobj().decompress(framed[4:])
    assert decoded == data


def test_random_pieces_are_raw_and_text_pieces_compressed(tmp_path: Path) -> None:
    r = random.Random(5)
    mixed = r.randbytes(CHUNK // 2) + text_like(CHUNK // 2)  # half of each: compressed
    disks = {0: r.randbytes(CHUNK + 300_000), 1: text_like(2 * CHUNK), 2: mixed}
    for i, data in disks.items():
        (tmp_path / f"disk{i}.qcow2").write_bytes(data)
    wire, m = pack(tmp_path)
    frames = frames_of(wire)
    assert [len(f) for f in frames] == [2, 2, 1]
    assert all(map(is_raw, frames[0]))
    assert sum(map(len, frames[0])) < len(disks[0]) + 1024  # raw blocks: a few bytes each
    assert not any(map(is_raw, frames[1] + frames[2]))
    assert sum(map(len, frames[1])) < 0.4 * len(disks[1])
    assert len(frames[2][0]) < 0.75 * len(mixed)
    stage = tmp_path / "stage"
    assert unpack(wire, stage) == m
    for i, data in disks.items():
        assert (stage / f"disk{i}.qcow2").read_bytes() == data


def test_a_stream_of_one_frame_per_disk_is_still_received(tmp_path: Path) -> None:
    """What senders before per-piece frames sent: the whole disk as one frame, its compressor's
    output cut into blocks."""
    r = random.Random(6)
    disks = {0: text_like(CHUNK + 12345), 1: r.randbytes(200_000)}
    for i, data in disks.items():
        (tmp_path / f"disk{i}.qcow2").write_bytes(data)
    _, m = pack(tmp_path)
    parts = [MAGIC, struct.pack(">I", len(m.to_json())), m.to_json().encode()]
    for data in disks.values():
        chunker = zstandard.ZstdCompressor(level=1).chunker(size=len(data), chunk_size=1 << 20)
        out = [*chunker.compress(data), *chunker.finish()]  # type: ignore[no-untyped-call]
        parts += [struct.pack(">I", len(x)) + x for x in out] + [struct.pack(">I", 0)]
    stage = tmp_path / "stage"
    assert unpack(b"".join(parts), stage) == m
    for i, data in disks.items():
        assert (stage / f"disk{i}.qcow2").read_bytes() == data
