"""Durable file operations, shared by every layer: a step that relies on a rename or a new file
syncs the directory that holds the name first."""

from __future__ import annotations

import os
from pathlib import Path

from vmreplica.errors import StorageError


def fsync_dir(path: Path) -> None:
    """Make renames, new files and unlinks in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot sync directory {path}: {exc.strerror or exc}") from exc


def fsync_file(path: Path) -> int:
    """fsync one file; returns the space it takes (allocated blocks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """A crash leaves the old file or the new one, never a cut one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
