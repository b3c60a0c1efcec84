"""The delta wire format: how one replication cycle travels from primary to replica.

Stream (one HTTPS POST body): ``b"VMRD1\\n"``, u32-be N, N bytes of manifest JSON; then each disk
in manifest order, raw (exactly file_size bytes) or, for zstd, zstd frames one after the other
cut into blocks (u32-be length in 1..16 MiB, payload) and ended by a 0 length. A sender makes one
frame of each piece of up to CHUNK bytes, and one block of each frame, raw zstd blocks where the
piece does not compress (delta_frames.py). Replicas before it, which read one frame per disk,
read these too: their decompressor goes on into the next frame; senders before it sent one
frame per disk, which a replica reads as before.

The manifest comes first so the replica refuses a wrong VM or sequence number before storing a
byte. Blocks mark where a frame ends because the decompressor that can tell (``decompressobj``)
returns a call's whole output at once (6 KiB of zstd inflate to 200 MiB of memory), while the
bounded one (``stream_writer``) cannot. Size and blake3 of each uncompressed file, checked as it
arrives, catch any corruption, so zstd's checksum is left off. I/O, hashing and (de)compression
run on one worker thread one batch ahead of the network: the event loop never waits on a disk,
and memory stays at a few CHUNKs. The replica renames each verified ``disk{i}.qcow2.part`` to
``disk{i}.qcow2`` and writes ``manifest.json`` last, marking a complete stage (delta_receive.py).

A stream resumed after a cut (delta_resume.py) is the same, less the disks the replica already
holds; the disk it stopped in goes on from the kept offset, as a new zstd frame when compressed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import errno
import functools
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import blake3

from vmreplica._internal import memory
from vmreplica._internal.files import write_atomic
from vmreplica._internal.transport.delta_frames import Frames, block
from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica.errors import (
    IntegrityError,
    InvalidArgument,
    StorageError,
)

StrPath = str | os.PathLike[str]
MAGIC = b"VMRD1\n"
MANIFEST = "manifest.json"
CONSISTENCIES = ("CrashConsistent", "ApplicationConsistent")
COMPRESSIONS = ("zstd", "none")
CHUNK = 4 << 20  # reads, blocks, writes, worker batches: up to 1.3x faster than 1 MiB
MAX_BLOCK = 16 << 20
AHEAD = 4  # pieces a sender reads and compresses ahead of the link
MAX_MANIFEST = 1 << 20
ZSTD_LEVEL = 1  # measured: level 3 is 12% slower on random data for a 1-2% smaller wire
# On a slow link the CPU waits for the link anyway: level 3 takes text-like data to 0.30 of its
# size instead of 0.32 at 90+ MB/s of input on this 2-core host; higher levels gain under 1%
# more at a fifth of the speed. The sender picks it for a link it measured below SLOW_LINK.
SLOW_LINK_LEVEL = 3
SLOW_LINK = 25_000_000  # bytes per second on the wire
THREADS = min(4, os.cpu_count() or 1)  # blake3, and zstd (1.2x on text with 2 cores)
_DISK_RE = re.compile(r"disk(\d+)\.qcow2")
_HEX64 = re.compile(r"[0-9a-f]{64}")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


ManifestCheck = Callable[["DeltaManifest"], None]
"""The receiver's own checks of a manifest, run before a byte of the delta is stored."""


@dataclass(frozen=True)
class DiskEntry:
    index: int
    file_size: int
    blake3: str  # hex, of the uncompressed file


@dataclass(frozen=True)
class DeltaManifest:
    vm_id: str
    sequence: int
    created: str  # ISO 8601
    consistency: str  # one of CONSISTENCIES
    compression: str  # one of COMPRESSIONS
    disks: tuple[DiskEntry, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeltaManifest:
        """Trusts nothing: the text comes from the network or from a file a crash may have cut."""
        try:
            raw = json.loads(text)
            disks = tuple(DiskEntry(d["index"], d["file_size"], d["blake3"]) for d in raw["disks"])
            fields = ("vm_id", "sequence", "created", "consistency", "compression")
            m = cls(**{k: raw[k] for k in fields}, disks=disks)
            datetime.fromisoformat(m.created)
        except (ValueError, TypeError, KeyError) as e:
            raise IntegrityError(f"malformed delta manifest: {e!r}") from None
        idx, hashes, vm = [d.index for d in m.disks], [d.blake3 for d in m.disks], m.vm_id
        valid = {
            "vm_id": isinstance(vm, str) and 0 < len(vm) <= 256 and vm.isprintable(),
            "sequence": _is_count(m.sequence),
            "consistency": m.consistency in CONSISTENCIES,
            "compression": m.compression in COMPRESSIONS,
            "disk indexes": idx and all(map(_is_count, idx)) and idx == sorted(set(idx)),
            "disk sizes": all(_is_count(d.file_size) for d in m.disks),
            "disk hashes": all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes),
        }
        if bad := [name for name, ok in valid.items() if not ok]:
            raise IntegrityError(f"malformed delta manifest: invalid {', '.join(bad)}")
        return m


def disk_file(directory: Path, n: int) -> Path:
    """Where disk ``n`` of a delta lies in a directory that holds one file per disk (the pending
    log, a stage, overlays)."""
    return directory / f"disk{n}.qcow2"


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def hash_file(path: Path) -> tuple[int, str]:
    """mmap is over twice as fast as chunked update (7 GB/s vs 3 measured) and frees the GIL."""
    digest = blake3.blake3(max_threads=THREADS).update_mmap(str(path)).hexdigest()
    return path.stat().st_size, digest


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def _build_manifest(d: Path, vm_id: str, seq: int, consistency: str, comp: str) -> DeltaManifest:
    if consistency not in CONSISTENCIES or comp not in COMPRESSIONS or not _is_count(seq):
        raise InvalidArgument(f"invalid delta {seq!r}: {consistency=}, compression={comp!r}")
    found = sorted((int(g[1]), p) for p in d.iterdir() if (g := _DISK_RE.fullmatch(p.name)))
    if not found:
        raise InvalidArgument(f"no disk files (disk0.qcow2, ...) in delta directory {d}")
    old = None
    with contextlib.suppress(OSError, IntegrityError):
        old = DeltaManifest.from_json((d / MANIFEST).read_bytes())
    same = old is not None and (old.vm_id, old.sequence) == (vm_id, seq)
    created = old.created if old and same else datetime.now(UTC).isoformat(timespec="seconds")
    disks = tuple(DiskEntry(i, *hash_file(p)) for i, p in found)
    new = DeltaManifest(vm_id, seq, created, consistency, comp, disks)
    if new != old:
        write_text_atomic(d / MANIFEST, new.to_json())
    return new


async def build_manifest(
    delta_dir: StrPath, vm_id: str, sequence: int, consistency: str, compression: str
) -> DeltaManifest:
    """Hash every ``disk{i}.qcow2`` into ``manifest.json``; a rerun keeps the creation time."""
    args = (Path(delta_dir), vm_id, sequence, consistency, compression)
    try:
        return await asyncio.to_thread(_build_manifest, *args)
    except OSError as e:
        raise StorageError(f"cannot build the manifest of delta {sequence}: {e}") from None


def _disk_pieces(
    path: Path, disk: DiskEntry, m: DeltaManifest, offset: int = 0, level: int = ZSTD_LEVEL
) -> Generator[bytes, None, None]:
    """The wire bytes of one disk from ``offset`` on, in pieces of about CHUNK; a file that
    changed size is refused."""
    left = disk.file_size - offset
    frames = Frames(level, THREADS) if m.compression == "zstd" else None
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while data := f.read(min(CHUNK, left) if left else 1):  # 1: notice a grown file
            if len(data) > left:
                break
            left -= len(data)
            yield frames.piece(data) if frames else data
    if left or data:
        raise IntegrityError(f"delta {m.sequence}: {path} changed size since its manifest")
    if frames:
        yield block(b"")


async def iter_stream(
    delta_dir: StrPath, manifest: DeltaManifest, start: ResumePoint | None = None,
    level: int = ZSTD_LEVEL,
) -> AsyncIterator[bytes]:  # fmt: skip
    """The request body; reading and compressing the next piece overlaps sending this one.

    From ``start`` on when the replica kept a cut stream: the disks before it are left out.
    ``level``: zstd's, for a compressed delta (the receiver needs no word of it).
    """
    yield MAGIC + block(manifest.to_json().encode())
    first, offset = (start.disk, start.offset) if start is not None else (0, 0)
    # Nothing below may block the event loop. A body the HTTP client drops when the connection
    # breaks is closed later by the garbage collector, and by then the pool's worker may have
    # gone with its executor (the collector clears the worker's weak reference to it first):
    # waiting on the pool there hung the whole agent, found by test_initial_compressed.py.
    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="vmr-delta-send")
    try:
        for disk in manifest.disks:
            if disk.index < first:
                continue
            at = offset if disk.index == first else 0
            path = Path(delta_dir, f"disk{disk.index}.qcow2")
            gen = _disk_pieces(path, disk, manifest, at, level)
            # The one worker runs them in order: AHEAD pieces are read and compressed while
            # the link carries the last ones, which evens out pieces slow to compress.
            ahead = collections.deque(pool.submit(next, gen, b"") for _ in range(AHEAD))
            try:
                while piece := await asyncio.wrap_future(ahead[0]):
                    ahead.popleft()
                    ahead.append(pool.submit(next, gen, b""))
                    yield piece
            except OSError as e:
                raise StorageError(f"cannot read delta {manifest.sequence}: {e}") from None
            finally:
                # Close the file once the worker is out of the generator: at once if it is.
                ahead[-1].add_done_callback(functools.partial(_close, gen))
    finally:
        pool.shutdown(wait=False)
        memory.trim()  # the pieces are freed: the heap that held them goes back


def _close(gen: Generator[bytes, None, None], _done: object) -> None:
    gen.close()
