"""Reading a disk for the block compare (block_hash.py): its views, an image's layout, and
readers that skip zero ranges without reading them.

An image file is read straight from the files of its chain, at the host offsets ``qemu-img map``
gives for each run of clusters (its layout, taken in the event loop's thread first: helpers must
start from there); the few runs map cannot place (compressed clusters) are read over NBD from a
``qemu-nbd --read-only`` that libnbd starts through socket activation. Without a layout an image,
and always a point-in-time export, is read over NBD whole.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nbd

from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica.errors import StorageError

ZERO = 2  # NBD_STATE_ZERO in base:allocation: the range reads as zeros
_STATUS_CHUNK = 1 << 30  # block status requests must stay below 4 GiB
CHUNK = 4 << 20  # bytes read at once, and handed to a hashing thread
_NBD_READ = 256 << 10  # one NBD request (bigger ones were slower through qemu-nbd, measured)


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


def connect(view: NbdView, writable: bool = False) -> Any:
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


def zero_ranges(handle: Any, offset: int, size: int) -> list[tuple[int, int]]:
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


class Reader(Protocol):
    size: int

    def zero(self, start: int, end: int) -> bool: ...
    def read(self, into: memoryview, start: int) -> None: ...
    def prefetch(self, start: int, end: int) -> None: ...
    def close(self) -> None: ...


class NbdReader:
    """A view read over NBD; zeros known from block status of the range it will read."""

    def __init__(self, view: NbdView, start_block: int, end_block: int, block_size: int) -> None:
        self._handle = connect(view)
        self.size = int(self._handle.get_size())
        start = min(self.size, start_block * block_size)
        zeros = zero_ranges(self._handle, start, min(self.size, end_block * block_size))
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


class FileReader:
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
                    self._nbd = connect(self._view)
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


def open_reader(view: NbdView, first_block: int, end_block: int, block_size: int) -> Reader:
    if view.layout is not None:
        return FileReader(view, view.layout)
    return NbdReader(view, first_block, end_block, block_size)
