"""The zstd frames of a compressed delta's disks (format: delta.py): one per piece, raw zstd blocks
where the piece does not compress.

Sender: each piece of up to CHUNK bytes is one frame. A piece whose spread samples do not
compress (random data, files already compressed) becomes a frame of raw blocks without running
the compressor: zstd level 1 costs 0.8 ns a byte of random data here, the copy a tenth of that.

Receiver: a frame is fed to zstd's streaming decompressor, except a raw frame (marked so by a
skippable frame before it) that begins where the decompressor stands between frames: its blocks'
bytes go straight to the disk's writer,
without the decompressor's two copies (into its buffer, then into a new bytes object). Where a
frame ends is known for one that states its content size and has no checksum (what senders
make: one frame per piece, or per disk before); after any other, every frame goes through the
decompressor. A stream that lies about it (a raw frame inside another frame, a frame cut short)
ends as wrong bytes, which the size and blake3 of the disk refuse like any other damage.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import zstandard

from vmreplica.errors import IntegrityError

RAW_BLOCK = 128 << 10  # zstd's largest block
# A skippable frame (decoders pass it by) tells a receiver that a frame of raw blocks follows: a
# compressor may well start a frame with the same bytes as the zstd frame header that follows.
RAW_MARK = struct.pack("<II", 0x184D2A56, 4) + b"vmr1"
# Magic; a descriptor with neither content size nor checksum nor dictionary; a 128 KiB window.
RAW_HEAD = RAW_MARK + b"\x28\xb5\x2f\xfd\x00" + bytes([(17 - 10) << 3])
SAMPLES, SAMPLE = 8, 8 << 10  # a piece is incompressible when every sample compresses to over
SAMPLE_RATIO = 0.9  # this much of its size (zstd level 1; text-like data: about 0.4)
_HEADER_MAX = 18  # bytes of a zstd frame header at most


def block(data: bytes) -> bytes:
    """A block of the stream: u32-be length, payload."""
    return struct.pack(">I", len(data)) + data


def raw_frame(data: bytes) -> bytes:
    """``data`` as one frame of raw zstd blocks after its mark, as a block of the stream (behind
    its length): one copy, no compressor. Each zstd block: a 3-byte little-endian header (size
    << 3, type raw = 0, last), then the bytes."""
    view = memoryview(data)
    parts: list[bytes | memoryview] = [b""]
    size = len(RAW_HEAD)
    for at in range(0, max(1, len(data)), RAW_BLOCK):
        piece = view[at : at + RAW_BLOCK]
        last = at + RAW_BLOCK >= len(data)
        parts += [(len(piece) << 3 | last).to_bytes(3, "little"), piece]
        size += 3 + len(piece)
    parts[0] = struct.pack(">I", size) + RAW_HEAD
    return b"".join(parts)


class Frames:
    """The sender's: each piece as one frame, compressed or raw, as a block of the stream."""

    def __init__(self, level: int, threads: int) -> None:
        self._zc = zstandard.ZstdCompressor(level=level, threads=threads)
        self._probe = zstandard.ZstdCompressor(level=1)

    def incompressible(self, data: bytes) -> bool:
        if len(data) < SAMPLES * SAMPLE:
            return False
        step, view = len(data) // SAMPLES, memoryview(data)
        for at in range(0, SAMPLES * step, step):
            if len(self._probe.compress(view[at : at + SAMPLE])) < SAMPLE_RATIO * SAMPLE:
                return False
        return True

    def piece(self, data: bytes) -> bytes:
        if not self.incompressible(data):
            frame = self._zc.compress(data)
            if len(frame) < len(data):
                return block(frame)
        return raw_frame(data)


class FrameReader:
    """The receiver's: the payload of each block of one disk, in pieces as they arrive, into
    ``out`` (which counts what it got in ``size()``) through the decompressor ``dec``, or past
    it for a raw frame that starts between frames. A block's first piece holds its frame's
    header (18 bytes at most) unless the block is shorter: the receiver's first piece of a
    block is at least min(its length, 256 KiB); a shorter one only goes through the
    decompressor, as does every frame after it."""

    def __init__(
        self, out: Callable[[bytes | memoryview], int], size: Callable[[], int],
        dec: Callable[[bytes | memoryview], int], label: str,
    ) -> None:  # fmt: skip
        self._out, self._size, self._dec, self._label = out, size, dec, label
        self._between = True  # the decompressor stands between frames
        self._ends_at: int | None = None  # out's size where its current frame ends, if known
        self._raw = False  # the current block is a raw frame, read here
        self._head = bytearray()  # a raw block's header cut between two pieces
        self._left = 0  # bytes of the current raw block yet to come
        self._last = self._done = False  # it is the frame's last; that one ended

    def write(self, data: bytes | memoryview, first: bool, end: bool) -> None:
        """A piece of a block's payload; ``first`` and ``end``: the block's first and last."""
        if first:
            self._start(data)
        if self._raw:
            self._raw_piece(memoryview(data)[len(RAW_HEAD) if first else 0 :])
        else:
            self._dec(data)
        if end:
            self._end()

    def _start(self, data: bytes | memoryview) -> None:
        self._raw = self._between and bytes(data[: len(RAW_HEAD)]) == RAW_HEAD
        if self._raw:
            self._head.clear()
            self._left, self._last, self._done = 0, False, False
            return
        if self._between:
            self._ends_at = None
            try:
                params = zstandard.get_frame_parameters(bytes(data[:_HEADER_MAX]))
            except zstandard.ZstdError:
                pass  # the decompressor will say what is wrong with it
            else:
                if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and not params.has_checksum:
                    self._ends_at = self._size() + params.content_size
        self._between = False

    def _raw_piece(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            if self._done:
                raise IntegrityError(f"{self._label}: bytes after the end of a raw zstd frame")
            if not self._left:
                taken = view[pos : pos + 3 - len(self._head)]
                self._head += taken
                pos += len(taken)
                if len(self._head) < 3:
                    return
                header = int.from_bytes(self._head, "little")
                self._head.clear()
                if header & 6 or header >> 3 > RAW_BLOCK:
                    raise IntegrityError(f"{self._label}: a bad block in a raw zstd frame")
                self._left, self._last = header >> 3, bool(header & 1)
                self._done = self._last and not self._left
                continue
            n = min(self._left, len(view) - pos)
            self._out(view[pos : pos + n])
            pos += n
            self._left -= n
            self._done = self._last and not self._left

    def _end(self) -> None:
        if self._raw:
            if not self._done:
                raise IntegrityError(f"{self._label}: a raw zstd frame cut short")
            self._raw, self._between = False, True
        elif self._ends_at is not None and self._size() == self._ends_at:
            self._between, self._ends_at = True, None
