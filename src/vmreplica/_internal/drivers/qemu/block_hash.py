"""Hashes of fixed-size blocks of a disk, read over NBD, and copies of chosen blocks: the block
compare of a resynchronization.

Each side hashes its own view: a point-in-time export (a unix socket and an export name), or an
image file nothing writes, served for the read by a ``qemu-nbd --read-only`` that libnbd starts
itself through socket activation (and ends when it disconnects). Block status
(``base:allocation``) skips holes and zero ranges without reading them, and a block that reads
as zeros hashes to None whether or not it is allocated, so the two sides agree on zeros whatever
their allocation. libnbd's calls block: each view is read in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import nbd

from vmreplica.errors import StorageError

ZERO = 2  # NBD_STATE_ZERO in base:allocation: the range reads as zeros
_STATUS_CHUNK = 1 << 30  # block status requests must stay below 4 GiB
MAX_BLOCK = 32 << 20  # QEMU's NBD server takes requests up to 32 MiB

BlockHash = bytes | None
"""blake3 of a block's bytes (32 bytes), or None for a block that reads as zeros."""


@dataclass(frozen=True)
class NbdView:
    """One disk as NBD serves it: an export on a socket, or an image file for qemu-nbd."""

    socket: Path | None = None
    export: str = ""
    image: Path | None = None


def _connect(view: NbdView, writable: bool = False) -> Any:
    handle = nbd.NBD()
    handle.add_meta_context("base:allocation")
    if view.image is not None:
        mode = [] if writable else ["--read-only"]
        handle.connect_systemd_socket_activation(
            ["qemu-nbd", *mode, "--format=qcow2", "--", str(view.image.absolute())]
        )
    else:
        handle.set_export_name(view.export)
        handle.connect_unix(str(view.socket))
    return handle


def _zero_ranges(handle: Any, offset: int, size: int) -> list[tuple[int, int]]:
    """The ranges block status says read as zeros, in order, from ``offset`` up to ``size``."""
    zeros: list[tuple[int, int]] = []
    replies: list[list[int]] = []

    def extent(metacontext: str, _offset: int, entries: list[int], _error: object) -> int:
        if metacontext == "base:allocation":
            replies.append([int(x) for x in entries])
        return 0

    while offset < size:
        replies.clear()
        handle.block_status(min(size - offset, _STATUS_CHUNK), offset, extent)
        if not replies or not replies[0] or len(replies[0]) % 2:
            raise StorageError(f"the NBD server sent no usable block status at offset {offset}")
        position = offset
        for length, flags in zip(replies[0][::2], replies[0][1::2], strict=True):
            if flags & ZERO:
                zeros.append((position, min(length, size - position)))
            position += length
        if position <= offset:
            raise StorageError(f"the NBD server sent an empty block status at offset {offset}")
        offset = position
    return zeros


def _covered(zeros: list[tuple[int, int]], start: int, end: int, hint: int) -> tuple[bool, int]:
    """Whether [start, end) lies within the zero ranges; ``hint`` is where to look from."""
    i = hint
    while i < len(zeros) and zeros[i][0] + zeros[i][1] <= start:
        i += 1
    position = start
    j = i
    while j < len(zeros) and zeros[j][0] <= position < end:
        position = zeros[j][0] + zeros[j][1]
        j += 1
    return position >= end, i


def hash_blocks(
    view: NbdView,
    block_size: int,
    first_block: int = 0,
    count: int | None = None,
) -> list[BlockHash]:
    """Hashes of ``count`` blocks from ``first_block`` (to the end of the disk when None);
    blocking (run it in a thread)."""
    _check_block_size(block_size)
    try:
        handle = _connect(view)
        try:
            size = int(handle.get_size())
            blocks = -(-size // block_size)
            last = blocks if count is None else min(blocks, first_block + count)
            start, end = first_block * block_size, min(size, last * block_size)
            zeros = _zero_ranges(handle, start, end)
            empty = bytes(block_size)
            out: list[BlockHash] = []
            hint = 0
            for block in range(first_block, last):
                begin = block * block_size
                stop = min(size, begin + block_size)
                is_zero, hint = _covered(zeros, begin, stop, hint)
                if is_zero:
                    out.append(None)
                    continue
                data = handle.pread(stop - begin, begin)
                out.append(None if data == empty[: len(data)] else blake3.blake3(data).digest())
            handle.shutdown()
            return out
        finally:
            del handle  # closes the connection (and ends a qemu-nbd it started)
    except nbd.Error as exc:
        where = view.image or f"{view.socket} ({view.export})"
        raise StorageError(f"reading {where} over NBD to hash it failed: {exc}") from exc


def copy_blocks(view: NbdView, dest: Path, blocks: list[int], block_size: int) -> int:
    """Copy ``blocks`` of ``view`` into the qcow2 image ``dest`` (made beforehand, nothing else
    open on it) at the same offsets, blocks that read as zeros as zero clusters; blocking.
    Returns the bytes written as data."""
    _check_block_size(block_size)
    written = 0
    try:
        source, target = _connect(view), _connect(NbdView(image=dest), writable=True)
        try:
            size = int(source.get_size())
            empty = bytes(block_size)
            for block in blocks:
                begin = block * block_size
                length = min(size, begin + block_size) - begin
                data = source.pread(length, begin)
                if data == empty[:length]:
                    target.zero(length, begin)
                else:
                    target.pwrite(data, begin)
                    written += length
            target.flush()
            source.shutdown()
            target.shutdown()
            return written
        finally:
            del source, target
    except nbd.Error as exc:
        raise StorageError(f"copying blocks into {dest} over NBD failed: {exc}") from exc


def view_size(view: NbdView) -> int:
    """The disk's virtual size, as NBD serves it; blocking."""
    try:
        handle = _connect(view)
        try:
            size = int(handle.get_size())
            handle.shutdown()
            return size
        finally:
            del handle
    except nbd.Error as exc:
        raise StorageError(
            f"reading the size of {view.image or view.export} failed: {exc}"
        ) from exc


def _check_block_size(block_size: int) -> None:
    if not 0 < block_size <= MAX_BLOCK or block_size % 512:
        raise ValueError(f"block size {block_size} is not a multiple of 512 up to {MAX_BLOCK}")


async def hash_view(
    view: NbdView, block_size: int, first_block: int = 0, count: int | None = None
) -> list[BlockHash]:
    return await asyncio.to_thread(hash_blocks, view, block_size, first_block, count)
