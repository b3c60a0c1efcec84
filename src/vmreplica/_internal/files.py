"""Durable file operations, shared by every layer: a step that relies on a rename or a new file
syncs the directory that holds the name first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmreplica.errors import IntegrityError, StorageError, VmrError

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """A blocking file step (the unlink of a large file frees its page cache and extents: tens
    of ms) in a worker thread, so the event loop goes on carrying streams meanwhile. A cancelled
    caller still waits for the step to end, as it would have for the blocking call, so that what
    follows it (a lock released, the next step) never overlaps it."""
    step = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await step
        raise


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


def write_json_atomic(path: Path, value: object) -> None:
    """`value` as JSON, atomically and durably (write_atomic); StorageError if it cannot be."""
    try:
        write_atomic(path, json.dumps(value).encode())
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def read_json_object(path: Path, damaged: type[VmrError] = IntegrityError) -> dict[str, Any] | None:
    """A JSON object written by write_json_atomic; None if there is no file (or it holds no
    object); `damaged` if it cannot be read or parsed."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise damaged(f"unreadable {path}: {e}") from e
    return value if isinstance(value, dict) else None
