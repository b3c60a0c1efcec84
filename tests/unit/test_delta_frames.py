"""A compressed delta's disks travel as one zstd frame per piece: raw zstd blocks, made without
the compressor, for a piece whose samples do not compress; and a stream of one frame per disk,
as senders before it made, is still received."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zstandard

from vmreplica._internal.transport import delta
from vmreplica._internal.transport.delta import CHUNK, MAGIC, build_manifest, iter_stream
from vmreplica._internal.transport.delta_frames import RAW_BLOCK, RAW_HEAD, FrameReader, raw_frame
from vmreplica._internal.transport.delta_receive import receive
from vmreplica.errors import IntegrityError

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
    return frame.startswith(RAW_HEAD)


@pytest.mark.parametrize("size", [1, 5, RAW_BLOCK - 1, RAW_BLOCK, RAW_BLOCK + 1,
                                  CHUNK])  # fmt: skip
def test_a_raw_frame_is_read_by_the_zstd_decoder(size: int) -> None:
    data = random.Random(size).randbytes(size)
    framed = raw_frame(data)
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4
    assert len(framed) <= size + 4 + len(RAW_HEAD) + 3 * (size // RAW_BLOCK + 1)
    reading = Reading()  # zstd's decoder alone, as replicas before raw frames read them
    for at in range(0, len(framed) - 4, 1000):
        reading.decompress(framed[4 + at : 4 + at + 1000])
    assert bytes(reading.out) == data and reading.through == len(framed) - 4


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


class Reading:
    """A FrameReader over a real decompressor, counting what went through it."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.through = 0
        dctx = zstandard.ZstdDecompressor()
        self.dec = dctx.stream_writer(self, 1 << 20, write_return_read=True)  # type: ignore[arg-type]
        self.reader = FrameReader(self.write, lambda: len(self.out), self.decompress, "disk 0")

    def decompress(self, data: bytes | memoryview) -> int:
        self.through += len(data)
        return int(self.dec.write(data))

    def write(self, data: bytes | memoryview) -> int:
        self.out += data
        return len(data)

    def feed(self, blocks: list[bytes], piece: int) -> None:
        """In pieces of ``piece`` bytes, but a block's first holds its frame's header, as the
        receiver's are (at least min(block, BATCH) bytes)."""
        for payload in blocks:
            head = max(piece, 18)
            rest = range(head, len(payload), piece)
            pieces = [payload[:head], *(payload[at : at + piece] for at in rest)]
            for i, data in enumerate(pieces):
                self.reader.write(data, i == 0, i == len(pieces) - 1)


def payloads(*blocks: bytes) -> list[bytes]:
    return [b[4:] for b in blocks]  # without the stream's length


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 4096, 1 << 20])
def test_raw_frames_between_frames_pass_the_decompressor_by(piece: int) -> None:
    r = random.Random(piece)
    text, noise = text_like(300_000), r.randbytes(RAW_BLOCK * 2 + 5)
    compressed = zstandard.ZstdCompressor(level=1).compress(text)
    blocks = [compressed, *payloads(raw_frame(noise), raw_frame(b"x")), compressed]
    reading = Reading()
    reading.feed(blocks, piece)
    assert bytes(reading.out) == text + noise + b"x" + text
    assert reading.through == 2 * len(compressed)


def test_after_a_frame_of_unknown_end_every_frame_goes_through_the_decompressor() -> None:
    text, noise = text_like(100_000), random.Random(1).randbytes(50_000)
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(text)
    assert RAW_HEAD[12:] == unsized[:6]  # a compressor may start a frame as raw_frame does
    blocks = [unsized, *payloads(raw_frame(noise))]
    reading = Reading()
    reading.feed(blocks, 10_000)
    assert bytes(reading.out) == text + noise
    assert reading.through == sum(map(len, blocks))


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda f: f[:-1], "cut short"),  # the last block's last byte missing
        (lambda f: f + b"?", "after the end"),
        (lambda f: f[:18] + bytes([f[18] | 2]) + f[19:], "a bad block"),  # type RLE
        (lambda f: f[:18] + bytes([f[18] & ~1]) + f[19:], "cut short"),  # no last block
    ],
)
def test_a_damaged_raw_frame_is_refused(damage: Callable[[bytes], bytes], error: str) -> None:
    frame = damage(raw_frame(b"abc" * 1000)[4:])
    with pytest.raises(IntegrityError, match=f"disk 0: .*{error}"):
        Reading().feed([frame], 100)
