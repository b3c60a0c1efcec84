"""Receiving a delta stream (format: delta.py) into a stage: checked as it arrives, and a
stream cut short kept as a resume point (delta_resume.py) instead of being thrown away."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import os
import shutil
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.http_exceptions
import blake3
import zstandard

from vmreplica._internal import memory
from vmreplica._internal.files import fsync_dir
from vmreplica._internal.transport import delta_resume
from vmreplica._internal.transport.delta import (
    CHUNK,
    DISK_FULL,
    MAGIC,
    MANIFEST,
    MAX_BLOCK,
    MAX_MANIFEST,
    DeltaManifest,
    DiskEntry,
    ManifestCheck,
    StrPath,
    disk_file,
    hash_file,
    write_text_atomic,
)
from vmreplica._internal.transport.delta_frames import FrameReader
from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica.errors import (
    ConnectionFailed,
    IntegrityError,
    InvalidState,
    StorageError,
)

# How a body that stops short shows, from the socket up through aiohttp's server.
_LOST = (
    OSError, EOFError, asyncio.IncompleteReadError, aiohttp.ClientPayloadError,
    aiohttp.http_exceptions.HttpProcessingError,
)  # fmt: skip


BATCH = 256 << 10


class StreamCut(ConnectionFailed):
    """The stream ended or stalled before the delta did: the connection was lost. The stage is
    kept as a resume point (delta_resume.py) instead of being removed."""


class _Input:
    """Incoming chunks of any size turned into exact reads. The chunks are held as they came:
    a read within one is a view of it, not a copy (the replica's CPU went to copies)."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._it, self._eof = aiter(chunks), False
        self._held: collections.deque[memoryview] = collections.deque()
        self._size = 0

    async def _fill(self) -> None:
        try:
            chunk = await anext(self._it)
        except StopAsyncIteration:
            self._eof = True
            return
        except ConnectionFailed as e:
            raise StreamCut(e.message) from None
        except _LOST as e:
            raise StreamCut(f"the connection was lost ({e.__class__.__name__})") from None
        if chunk:
            self._held.append(memoryview(chunk))
            self._size += len(chunk)

    async def read(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the stream; a connection lost is a :class:`StreamCut`."""
        while self._size < n and not self._eof:
            await self._fill()
        return bytes(self._take(n))

    async def read_some(self, n: int) -> bytes | memoryview:
        """Up to n bytes, as soon as :data:`BATCH` of them (or n, or the end) are here: a cut
        loses less than a batch, and a link that delivers 1.5 KiB segments still makes batches
        worth a worker's hand-off. Within a chunk that holds a batch: that chunk's bytes only,
        uncopied. b"" at the end."""
        least = min(n, BATCH)
        while self._size < least and not self._eof:
            await self._fill()
        if self._held and len(self._held[0]) >= least:
            return self._take(min(n, len(self._held[0])))
        return self._take(n)

    def _take(self, n: int) -> bytes | memoryview:
        """Up to n bytes from the front: a view where one chunk holds them, else joined."""
        parts: list[memoryview] = []
        want = n
        while want and self._held:
            head = self._held[0]
            if len(head) <= want:
                parts.append(self._held.popleft())
            else:
                parts.append(head[:want])
                self._held[0] = head[want:]
            want -= len(parts[-1])
        self._size -= n - want
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def disk(
        self, entry: DiskEntry, compressed: bool, label: str, offset: int = 0
    ) -> AsyncIterator[tuple[bytes | memoryview, bool, bool]]:
        """One disk as sent from ``offset``: raw up to its size, or its blocks' payloads up to
        the 0 block; in pieces as they arrive, each with whether it is its block's first and
        last."""
        left, truncated = entry.file_size - offset, f"{label}: stream truncated (connection lost?)"
        while compressed or left:
            n = left
            if compressed:
                if len(head := await self.read(4)) < 4:
                    raise StreamCut(truncated)
                if (n := struct.unpack(">I", head)[0]) == 0:
                    return
                if n > MAX_BLOCK:
                    raise IntegrityError(f"{label}: bad block length (corrupted in transit?)")
            first = True
            while n:
                if not (data := await self.read_some(min(n, CHUNK))):
                    raise StreamCut(truncated)
                n -= len(data)
                left -= 0 if compressed else len(data)
                yield data, first, not n
                first = False


class _Disk:
    """Worker-side writer of one staged disk: bounded, hashed and size-checked as it goes."""

    def __init__(
        self, stage: Path, entry: DiskEntry, sequence: int, compressed: bool,
        kept: int | None = None,
    ) -> None:  # fmt: skip
        """``kept``: the bytes a cut stream left in the part file, to go on from."""
        self.path, self.entry, self.size = stage / f"disk{entry.index}.qcow2.part", entry, 0
        self.label, self.hasher = f"delta {sequence} disk {entry.index}", blake3.blake3()
        fresh = os.O_EXCL if kept is None else 0
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | fresh | os.O_CLOEXEC, 0o600)
        self.offset = kept or 0
        self.frames: FrameReader | None = None
        if compressed:
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << 25)
            # stream_writer only calls write(), with pieces of at most CHUNK
            dec = dctx.stream_writer(self, CHUNK, write_return_read=True, closefd=False)  # type: ignore[arg-type]
            self.frames = FrameReader(self.write, lambda: self.size, dec.write, self.label)

    def take(self, data: bytes | memoryview, first: bool, end: bool) -> None:
        """A piece as it came: a block's (``first``, ``end``: its first, its last), or raw."""
        if self.frames is not None:
            self.frames.write(data, first, end)
        else:
            self.write(data)

    def write(self, data: bytes | memoryview) -> int:
        if self.size + len(data) > self.entry.file_size:
            raise IntegrityError(f"{self.label}: larger than announced (corrupted in transit?)")
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)
        return len(data)

    def resume(self) -> None:
        """Keep the first ``offset`` bytes a cut stream left, hashed again from the file."""
        os.ftruncate(self.fd, self.offset)
        with open(self.path, "rb", buffering=0) as f:
            while self.size < self.offset and (data := f.read(min(CHUNK, self.offset - self.size))):
                self.hasher.update(data)
                self.size += len(data)
        if self.size != self.offset:
            raise IntegrityError(f"{self.label}: the kept part is shorter than its resume point")
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def keep(self) -> int:
        """After a cut: what reached the file, durably; the resume point's offset."""
        os.fsync(self.fd)
        return self.size

    def finish(self) -> None:
        if self.size != self.entry.file_size:
            raise IntegrityError(f"{self.label}: smaller than announced (corrupted in transit?)")
        if self.hasher.hexdigest() != self.entry.blake3:
            raise IntegrityError(f"{self.label}: hash mismatch (corrupted in transit?)")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.path, self.path.with_suffix(""))


async def receive(
    chunks: AsyncIterable[bytes],
    staging_dir: StrPath,
    *,
    expected_vm_id: str,
    check_manifest: ManifestCheck | None = None,
    max_file_size: int | None = None,
    resume: tuple[int, int] | None = None,
) -> DeltaManifest:
    """Stage a delta in ``staging_dir`` (absent or empty; removed on failure); check_manifest
    runs before anything is written, so a refused delta costs no disk space.

    A stream that is cut (:class:`StreamCut`) leaves the stage as a resume point instead; with
    ``resume`` (disk, offset) the stream goes on from the point the stage holds.
    """
    inp, stage = _Input(chunks), Path(staging_dir)
    head = await inp.read(len(MAGIC) + 4)
    if head and len(head) < len(MAGIC) + 4 and head[: len(MAGIC)] == MAGIC[: len(head)]:
        raise StreamCut("delta stream header truncated (connection lost?)")
    if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
        raise IntegrityError("not a vmreplica delta stream (bad magic or truncated header)")
    (n,) = struct.unpack(">I", head[len(MAGIC) :])
    if n > MAX_MANIFEST:
        raise IntegrityError("delta stream header oversized")
    if len(js := await inp.read(n)) < n:
        raise StreamCut("delta stream header truncated (connection lost?)")
    m = DeltaManifest.from_json(js)
    name = f"delta {m.sequence} of VM {m.vm_id}"
    if m.vm_id != expected_vm_id:
        raise IntegrityError(f"{name} was sent to the replication of VM {expected_vm_id}")
    if check_manifest is not None:
        check_manifest(m)
    if max_file_size is not None and any(d.file_size > max_file_size for d in m.disks):
        raise IntegrityError(f"{name}: a disk exceeds the limit of {max_file_size} bytes")
    digest = delta_resume.digest(m.to_json())
    first, offset = 0, 0
    if resume is not None:
        if delta_resume.load(stage) != ResumePoint(m.sequence, digest, *resume):
            raise IntegrityError(
                f"{name}: cannot resume at disk {resume[0]} offset {resume[1]}: the replica "
                "holds no such cut stream"
            )
        first, offset = resume
        if missing := [
            d.index for d in m.disks if d.index < first and not disk_file(stage, d.index).is_file()
        ]:
            raise IntegrityError(f"{name}: cannot resume: disk {missing[0]} is not staged")
        delta_resume.clear(stage)
    elif stage.exists() and any(stage.iterdir()):
        raise InvalidState(f"cannot stage {name}: {stage} still holds another delta")
    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="vmr-delta-recv")
    busy: cf.Future[object] | None = None
    disk: _Disk | None = None
    current = first  # the disk being received: where a cut stream would resume
    compressed = m.compression == "zstd"

    async def run(fn: Callable[..., object], *args: Any, wait: bool = False) -> None:
        """Start fn once the previous batch is done: one batch on disk while the next arrives."""
        nonlocal busy
        if busy is not None:
            await asyncio.wrap_future(busy)
        busy = pool.submit(fn, *args)
        if wait:
            await asyncio.wrap_future(busy)

    ok = cut = False
    try:
        stage.mkdir(parents=True, exist_ok=True)
        need, free = sum(d.file_size for d in m.disks), shutil.disk_usage(stage).free
        if resume is None and need > free:  # fail before the transfer rather than after it
            raise OSError(errno.ENOSPC, f"{need} bytes needed, {free} free")
        for entry in m.disks:
            if entry.index < first:
                continue
            kept = offset if resume is not None and entry.index == first else None
            current = entry.index
            disk = _Disk(stage, entry, m.sequence, compressed, kept)
            if kept is not None:
                await run(disk.resume, wait=True)
            async for data, first, end in inp.disk(entry, compressed, disk.label, kept or 0):
                await run(disk.take, data, first, end)
            await run(disk.finish, wait=True)
            disk, current = None, entry.index + 1
        if await inp.read(1):
            raise IntegrityError(f"{name}: unexpected data after the last disk")
        await run(write_text_atomic, stage / MANIFEST, m.to_json())
        await run(fsync_dir, stage.parent, wait=True)
        ok = True
        return m
    except StreamCut:
        cut = True
        raise
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{name}: bad compressed data ({e}); corrupted in transit?") from None
    except OSError as e:
        what = "disk full while staging" if e.errno in DISK_FULL else "cannot stage"
        where = f"{e.filename}: " if e.filename else ""
        raise StorageError(f"{what} {name}: {where}{e.strerror or e}") from None
    finally:
        if not ok and busy is not None:
            last = asyncio.wrap_future(busy)
            with contextlib.suppress(BaseException):  # the loop stays free while a batch ends
                await asyncio.wait([last])
                if not last.cancelled():
                    # Read: the stream's own error is what is raised; asyncio would otherwise log
                    # this one as "never retrieved".
                    last.exception()
        pool.shutdown(wait=True)  # no write may race the removal below
        memory.trim()  # the pieces are freed: the heap that held them goes back
        if not ok:
            _leave(stage, disk, ResumePoint(m.sequence, digest, current, 0) if cut else None)


def _leave(stage: Path, disk: _Disk | None, cut: ResumePoint | None) -> None:
    """After a failure: a cut stream's stage is kept as a resume point; anything else goes."""
    kept = False
    with contextlib.suppress(OSError):
        if cut is not None:
            at = disk.keep() if disk is not None and disk.fd >= 0 else 0
            delta_resume.save(stage, dataclasses.replace(cut, offset=at))
            kept = True
    if disk is not None and disk.fd >= 0:
        os.close(disk.fd)
    if not kept:
        shutil.rmtree(stage, ignore_errors=True)  # it was empty: all in it is ours


def stage_is_complete(staging_dir: StrPath) -> DeltaManifest | None:
    """After a restart: the manifest if the stage is whole and intact. Blocking: it rehashes."""
    stage = Path(staging_dir)
    try:
        m = DeltaManifest.from_json((stage / MANIFEST).read_bytes())
        for d in m.disks:
            if hash_file(stage / f"disk{d.index}.qcow2") != (d.file_size, d.blake3):
                return None
    except (OSError, IntegrityError):
        return None
    return m
