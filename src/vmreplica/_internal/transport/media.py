"""Offline media for an initial replication (``start-initial --destination DIR``): one standalone
image per replicated disk, and ``manifest.json`` naming the VM, each disk's virtual size, and each
file's size and blake3.

The primary writes the manifest last (through a temporary name), so a directory without one was
not finished. The replica reads media only through :func:`read_manifest` and
:func:`copy_verified`, which refuse, with the reason, media of another VM, of other disk sizes,
truncated (file size) or corrupt (hash), before anything of the replica changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import blake3

from vmreplica._internal.files import fsync_dir
from vmreplica._internal.transport.fields import Body
from vmreplica.errors import IntegrityError, InvalidArgument, StorageError

MANIFEST = "manifest.json"
FORMAT = "vmreplica-initial-media"
VERSION = 1
MAX_DISKS = 64  # as for peer requests (transport/protocol.py)
MAX_DISK_SIZE = 1 << 50
MAX_NAME = 100
_CHUNK = 4 << 20
_HEX64 = frozenset("0123456789abcdef")


def disk_name(n: int) -> str:
    return f"disk{n}.qcow2"


@dataclasses.dataclass(frozen=True)
class MediaDisk:
    index: int
    virtual_size: int
    file_size: int
    blake3: str


@dataclasses.dataclass(frozen=True)
class MediaManifest:
    vm_id: str
    vm_name: str
    primary_server: str
    created: str
    disks: tuple[MediaDisk, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "media manifest")
        if b.string("format", 64) != FORMAT or b.integer("version", 0, 1000) != VERSION:
            raise InvalidArgument(f"not vmreplica initial media of version {VERSION}")
        raw = b.raw("disks")
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_DISKS:
            raise InvalidArgument("media manifest: field 'disks' must list the disks")
        disks = []
        for n, item in enumerate(raw):
            if not isinstance(item, dict):
                raise InvalidArgument("media manifest: each disk must be an object")
            d = Body(item, f"media manifest disk {n}")
            digest = d.string("blake3", 64)
            if len(digest) != 64 or not set(digest) <= _HEX64:
                raise InvalidArgument(f"media manifest disk {n}: blake3 must be 64 hex digits")
            if d.integer("index", 0, MAX_DISKS) != n:
                raise InvalidArgument(f"media manifest: disk {n} is out of order")
            disks.append(
                MediaDisk(
                    n,
                    d.integer("virtual_size", 1, MAX_DISK_SIZE),
                    d.integer("file_size", 1, MAX_DISK_SIZE * 2),
                    digest,
                )
            )
        return cls(
            vm_id=b.vm_id(), vm_name=b.string("vm_name", MAX_NAME),
            primary_server=b.string("primary_server", 255), created=b.string("created", 64),
            disks=tuple(disks),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """The file's size and blake3, read once."""
    hasher, size = blake3.blake3(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(len(chunk))
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
    return size, hasher.hexdigest()


def write_manifest(directory: Path, manifest: MediaManifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
        fsync_dir(directory)
    except OSError as e:
        raise StorageError(f"cannot write {directory / MANIFEST}: {e.strerror or e}") from e


MAX_MANIFEST = 1 << 20  # bytes: 64 disks take a few KiB


def _open_regular(path: Path) -> int:
    """A descriptor of ``path``, refused unless it is a regular file: media is not trusted, and
    a FIFO there would block the import (holding the replica lock), a device never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open must not wait
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{path} on the media is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_manifest(directory: Path) -> MediaManifest:
    path = directory / MANIFEST
    try:
        with os.fdopen(_open_regular(path), "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
        if len(raw) > MAX_MANIFEST:
            raise IntegrityError(f"{path} is larger than {MAX_MANIFEST} bytes: not a manifest")
        text = raw.decode()
    except FileNotFoundError:
        raise InvalidArgument(
            f"{directory} holds no {MANIFEST}: not initial media, or its export did not finish"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return MediaManifest.from_json(data)
    except (ValueError, InvalidArgument) as e:
        message = e.message if isinstance(e, InvalidArgument) else str(e)
        raise IntegrityError(f"{path} is damaged: {message}") from e


def copy_verified(
    source: Path, dest: Path, expected: MediaDisk, progress: Callable[[int], None] | None = None
) -> None:
    """Copy one disk's file off the media, hashing what is read; a file that is not exactly the
    one the manifest names (truncated, grown, corrupt) leaves no copy behind."""
    hasher, size = blake3.blake3(), 0
    try:
        with os.fdopen(_open_regular(source), "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > expected.file_size:
                    break
                hasher.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except FileNotFoundError:
        dest.unlink(missing_ok=True)
        raise IntegrityError(f"{source} is missing from the media") from None
    except OSError as e:
        dest.unlink(missing_ok=True)
        full = "disk full: " if e.errno in (28, 122) else ""
        raise StorageError(f"{full}cannot copy {source} to {dest}: {e.strerror or e}") from e
    if size != expected.file_size:
        dest.unlink(missing_ok=True)
        raise IntegrityError(
            f"{source} is {'larger' if size > expected.file_size else 'shorter'} than the "
            f"manifest says ({expected.file_size} bytes): truncated or altered media"
        )
    if hasher.hexdigest() != expected.blake3:
        dest.unlink(missing_ok=True)
        raise IntegrityError(f"{source} does not match its blake3 in the manifest: corrupt media")
