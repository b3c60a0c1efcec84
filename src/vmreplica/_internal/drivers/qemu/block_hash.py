"""Hashes of fixed-size blocks of a disk, and copies of chosen blocks: the block compare of a
resynchronization.

Each side hashes its own view: a point-in-time export of a running VM (a unix socket and an
export name, read over NBD), or an image file nothing writes. An image file is read straight from
the files of its chain, at the host offsets ``qemu-img map`` gives for each run of clusters (its
layout, taken in the event loop's thread first: helpers must start from there); the few runs
map cannot place (compressed clusters) are read over NBD from a ``qemu-nbd --read-only`` that
libnbd starts through socket activation. Without a layout an image is read over NBD whole.
Zero ranges (block status, or map's zero runs) are skipped without reading, and a block that
reads as zeros hashes to None whether or not it is allocated, so both sides agree on zeros
whatever their allocation. Reading and hashing block: run them in a worker thread.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import nbd

from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica.errors import StorageError

ZERO = 2  # NBD_STATE_ZERO in base:allocation: the range reads as zeros
_STATUS_CHUNK = 1 << 30  # block status requests must stay below 4 GiB
MAX_BLOCK = 32 << 20  # QEMU's NBD server takes requests up to 32 MiB
CHUNK = 4 << 20  # bytes read at once, and handed to a hashing thread
PREFETCH = 4  # chunks the kernel is asked to read ahead of the one being read
HASHERS = max(1, min(4, os.cpu_count() or 1))  # hashing threads per hash_blocks call
_NBD_READ = 256 << 10  # one NBD request (bigger ones were slower through qemu-nbd, measured)

BlockHash = bytes | None
"""blake3 of a block's bytes (32 bytes), or None for a block that reads as zeros."""


@dataclass(frozen=True)
class Run:
    """Guest bytes [start, start+length): zeros, in ``files[file]`` at ``offset``, or, where
    ``file`` is None, only readable through QEMU's block layer."""

    start: int
    length: int
    zero: bool
    file: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class Layout:
    """Where an image's guest bytes lie: its chain's files (top first) and runs, in order."""

    files: tuple[Path, ...]
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class NbdView:
    """One disk: an export on a socket, or an image file (its layout, once known)."""

    socket: Path | None = None
    export: str = ""
    image: Path | None = None
    layout: Layout | None = None


async def image_layout(image: Path) -> Layout:
    """The layout of an image nothing writes while it is used; runs qemu-img twice."""
    chain = await qemu_img.info_chain(image)
    files = tuple(Path(str(i["filename"])).absolute() for i in chain)
    runs = []
    for e in await qemu_img.map(image):
        if e.zero or not e.present:
            runs.append(Run(e.start, e.length, zero=True))
        elif e.data and e.offset is not None and e.depth < len(files):
            runs.append(Run(e.start, e.length, zero=False, file=e.depth, offset=e.offset))
        else:
            runs.append(Run(e.start, e.length, zero=False))
    return Layout(files, tuple(runs))


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


class _Reader(Protocol):
    size: int

    def zero(self, start: int, end: int) -> bool: ...
    def read(self, into: memoryview, start: int) -> None: ...
    def prefetch(self, start: int, end: int) -> None: ...
    def close(self) -> None: ...


class _NbdReader:
    """A view read over NBD; zeros known from block status of the range it will read."""

    def __init__(self, view: NbdView, start_block: int, end_block: int, block_size: int) -> None:
        self._handle = _connect(view)
        self.size = int(self._handle.get_size())
        start = min(self.size, start_block * block_size)
        zeros = _zero_ranges(self._handle, start, min(self.size, end_block * block_size))
        self._starts = [z[0] for z in zeros]
        self._zeros = zeros

    def zero(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        position = start
        while 0 <= i < len(self._zeros) and self._zeros[i][0] <= position < end:
            position = max(position, self._zeros[i][0] + self._zeros[i][1])
            i += 1
        return position >= end

    def read(self, into: memoryview, start: int) -> None:
        for done in range(0, len(into), _NBD_READ):
            piece = into[done : done + _NBD_READ]
            piece[:] = self._handle.pread(len(piece), start + done)

    def prefetch(self, start: int, end: int) -> None:
        pass

    def close(self) -> None:
        self._handle.shutdown()


class _FileReader:
    """An image read from its chain's files where its layout places the bytes; the rest (rare:
    compressed clusters) over NBD."""

    def __init__(self, view: NbdView, layout: Layout) -> None:
        self._view = view
        self._runs = layout.runs
        self._starts = [r.start for r in layout.runs]
        last = layout.runs[-1] if layout.runs else None
        self.size = last.start + last.length if last else 0
        self._fds: list[int] = []
        self._nbd: Any = None
        self._zeros = memoryview(bytes(CHUNK))
        try:
            for path in layout.files:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            self.close()
            raise

    def _pieces(self, start: int, end: int) -> Iterator[tuple[Run, int, int]]:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self._runs) and self._runs[i].start < end:
            run = self._runs[i]
            a, b = max(start, run.start), min(end, run.start + run.length)
            if a < b:
                yield run, a, b
            i += 1

    def zero(self, start: int, end: int) -> bool:
        covered = start
        for run, a, b in self._pieces(start, end):
            if not run.zero or a > covered:
                return False
            covered = b
        return covered >= end

    def read(self, into: memoryview, start: int) -> None:
        covered = start
        for run, a, b in self._pieces(start, start + len(into)):
            if a != covered:
                raise StorageError(f"the layout of {self._view.image} has a gap at {covered}")
            piece = into[a - start : b - start]
            if run.zero:
                piece[:] = self._zeros[: b - a]
            elif run.file is None:
                if self._nbd is None:
                    self._nbd = _connect(self._view)
                piece[:] = self._nbd.pread(b - a, a)
            else:
                self._pread(run.file, piece, run.offset + (a - run.start))
            covered = b
        if covered != start + len(into):
            raise StorageError(f"the layout of {self._view.image} ends at {covered}")

    def _pread(self, file: int, into: memoryview, offset: int) -> None:
        while len(into):
            got = os.preadv(self._fds[file], [into], offset)
            if got <= 0:
                raise StorageError(f"{self._view.image}: its chain's file {file} ends early")
            into, offset = into[got:], offset + got

    def prefetch(self, start: int, end: int) -> None:
        """Have the kernel read the next chunk while this one is hashed."""
        for run, a, b in self._pieces(start, end):
            if run.file is not None:
                offset = run.offset + (a - run.start)
                os.posix_fadvise(self._fds[run.file], offset, b - a, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._nbd is not None:
            self._nbd.shutdown()
            self._nbd = None


def _reader(view: NbdView, first_block: int, end_block: int, block_size: int) -> _Reader:
    if view.layout is not None:
        return _FileReader(view, view.layout)
    return _NbdReader(view, first_block, end_block, block_size)


def _failed(view: NbdView, what: str, exc: Exception) -> StorageError:
    where = view.image or f"{view.socket} ({view.export})"
    return StorageError(f"{what} {where} failed: {exc}")


def hash_blocks(
    view: NbdView,
    block_size: int,
    first_block: int = 0,
    count: int | None = None,
) -> list[BlockHash]:
    """Hashes of ``count`` blocks from ``first_block`` (to the end of the disk when None);
    blocking (run it in a thread). This thread reads chunk after chunk while a few others hash
    the chunks already read (blake3 lets go of the GIL)."""
    _check_block_size(block_size)
    end_block = first_block + count if count is not None else 1 << 62
    try:
        reader = _reader(view, first_block, end_block, block_size)
    except (nbd.Error, OSError) as exc:
        raise _failed(view, "opening", exc) from exc
    try:
        last = min(-(-reader.size // block_size), end_block)
        tail = min(block_size, reader.size - (last - 1) * block_size) if last else block_size
        zero_digests = {n: blake3.blake3(bytes(n)).digest() for n in {block_size, tail}}
        chunk_blocks = max(1, CHUNK // block_size)
        buffers = [memoryview(bytearray(chunk_blocks * block_size)) for _ in range(HASHERS + 1)]
        free = list(range(len(buffers)))
        queue: collections.deque[tuple[Future[list[BlockHash]] | list[BlockHash], int | None]]
        queue = collections.deque()
        out: list[BlockHash] = []

        def settle_oldest() -> None:
            hashes, buffer = queue.popleft()
            out.extend(hashes.result() if isinstance(hashes, Future) else hashes)
            if buffer is not None:
                free.append(buffer)

        with ThreadPoolExecutor(HASHERS, thread_name_prefix="block-hash") as hashers:
            for chunk in range(first_block, last, chunk_blocks):
                begin = chunk * block_size
                stop = min(reader.size, min(last, chunk + chunk_blocks) * block_size)
                reader.prefetch(stop, min(reader.size, stop + PREFETCH * (stop - begin)))
                spans = [(a, min(stop, a + block_size)) for a in range(begin, stop, block_size)]
                if reader.zero(begin, stop):
                    queue.append(([None] * len(spans), None))
                    continue
                while not free:
                    settle_oldest()
                buffer = free.pop()
                reader.read(buffers[buffer][: stop - begin], begin)
                zeros = [reader.zero(a, b) for a, b in spans]
                job = hashers.submit(
                    _hash_chunk, buffers[buffer], begin, spans, zeros, zero_digests
                )
                queue.append((job, buffer))
            while queue:
                settle_oldest()
        return out
    except (nbd.Error, OSError) as exc:
        raise _failed(view, "reading to hash", exc) from exc
    finally:
        reader.close()


def _hash_chunk(
    buffer: memoryview, begin: int, spans: list[tuple[int, int]], zeros: list[bool],
    zero_digests: dict[int, bytes],
) -> list[BlockHash]:  # fmt: skip
    out: list[BlockHash] = []
    for (a, b), is_zero in zip(spans, zeros, strict=True):
        if is_zero:
            out.append(None)
            continue
        digest = blake3.blake3(buffer[a - begin : b - begin]).digest()
        out.append(None if digest == zero_digests[b - a] else digest)
    return out


def copy_blocks(view: NbdView, dest: Path, blocks: list[int], block_size: int) -> int:
    """Copy ``blocks`` of ``view`` into the qcow2 image ``dest`` (made beforehand, nothing else
    open on it) at the same offsets, blocks that read as zeros as zero clusters; blocking.
    Returns the bytes written as data."""
    _check_block_size(block_size)
    written = 0
    try:
        first, end = (min(blocks), max(blocks) + 1) if blocks else (0, 0)
        source = _reader(view, first, end, block_size)
        try:
            target = _connect(NbdView(image=dest), writable=True)
            buffer = memoryview(bytearray(block_size))
            empty = bytes(block_size)
            for block in blocks:
                begin = block * block_size
                length = min(source.size, begin + block_size) - begin
                data = buffer[:length]
                if source.zero(begin, begin + length):
                    target.zero(length, begin)
                    continue
                source.read(data, begin)
                if data == empty[:length]:
                    target.zero(length, begin)
                else:
                    target.pwrite(bytes(data), begin)
                    written += length
            target.flush()
            target.shutdown()
            return written
        finally:
            source.close()
    except (nbd.Error, OSError) as exc:
        raise StorageError(f"copying blocks into {dest} over NBD failed: {exc}") from exc


def view_size(view: NbdView) -> int:
    """The disk's virtual size, as its layout or NBD says; blocking."""
    if view.layout is not None:
        last = view.layout.runs[-1] if view.layout.runs else None
        return last.start + last.length if last else 0
    try:
        handle = _connect(view)
        try:
            size = int(handle.get_size())
            handle.shutdown()
            return size
        finally:
            del handle
    except nbd.Error as exc:
        raise _failed(view, "reading the size of", exc) from exc


def _check_block_size(block_size: int) -> None:
    if not 0 < block_size <= MAX_BLOCK or block_size % 512:
        raise ValueError(f"block size {block_size} is not a multiple of 512 up to {MAX_BLOCK}")


async def with_layout(view: NbdView) -> NbdView:
    """An image view that will be read from its files; an export stays as it is."""
    if view.image is None or view.layout is not None:
        return view
    return dataclasses.replace(view, layout=await image_layout(view.image))


async def hash_view(
    view: NbdView, block_size: int, first_block: int = 0, count: int | None = None
) -> list[BlockHash]:
    view = await with_layout(view)
    return await asyncio.to_thread(hash_blocks, view, block_size, first_block, count)
