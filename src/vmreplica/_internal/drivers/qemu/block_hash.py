"""Hashes of fixed-size blocks of a disk, read over NBD: the block compare of a resynchronization.

Each side hashes its own view: a point-in-time export (a unix socket and an export name), or an
image file nothing writes, served for the read by a ``qemu-nbd --read-only`` that libnbd starts
itself through socket activation (and ends when it disconnects). Block status
(``base:allocation``) skips holes and zero ranges without reading them, and a block that reads
as zeros hashes to None whether or not it is allocated, so the two sides agree on zeros whatever
their allocation. libnbd's calls block: each view is read in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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


def _connect(view: NbdView) -> Any:
    handle = nbd.NBD()
    handle.add_meta_context("base:allocation")
    if view.image is not None:
        handle.connect_systemd_socket_activation(
            ["qemu-nbd", "--read-only", "--format=qcow2", "--", str(view.image.absolute())]
        )
    else:
        handle.set_export_name(view.export)
        handle.connect_unix(str(view.socket))
    return handle


def _zero_ranges(handle: Any, size: int) -> list[tuple[int, int]]:
    """The ranges block status says read as zeros, in order."""
    zeros: list[tuple[int, int]] = []
    replies: list[list[int]] = []

    def extent(metacontext: str, _offset: int, entries: list[int], _error: object) -> int:
        if metacontext == "base:allocation":
            replies.append([int(x) for x in entries])
        return 0

    offset = 0
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
    progress: Callable[[int, int], None] | None = None,
) -> list[BlockHash]:
    """Hashes of blocks ``first_block`` to the end of the disk; blocking (run it in a thread)."""
    if not 0 < block_size <= MAX_BLOCK or block_size % 512:
        raise ValueError(f"block size {block_size} is not a multiple of 512 up to {MAX_BLOCK}")
    try:
        handle = _connect(view)
        try:
            size = int(handle.get_size())
            zeros = _zero_ranges(handle, size)
            blocks = -(-size // block_size)
            empty = bytes(block_size)
            out: list[BlockHash] = []
            hint = 0
            for block in range(first_block, blocks):
                start = block * block_size
                end = min(size, start + block_size)
                is_zero, hint = _covered(zeros, start, end, hint)
                if is_zero:
                    out.append(None)
                else:
                    data = handle.pread(end - start, start)
                    out.append(None if data == empty[: len(data)] else blake3.blake3(data).digest())
                if progress is not None:
                    progress(block + 1, blocks)
            handle.shutdown()
            return out
        finally:
            del handle  # closes the connection (and ends a qemu-nbd it started)
    except nbd.Error as exc:
        where = view.image or f"{view.socket} ({view.export})"
        raise StorageError(f"reading {where} over NBD to hash it failed: {exc}") from exc


async def hash_view(
    view: NbdView,
    block_size: int,
    first_block: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[BlockHash]:
    return await asyncio.to_thread(hash_blocks, view, block_size, first_block, progress)
