"""What the replica chain (chain.py) shares about its files: a recovery point's file as listed,
and file-system failures turned into one-line errors."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmreplica.errors import StorageError


@dataclass(frozen=True)
class RecoveryPointFile:
    id: int
    path: Path
    size_bytes: int
    """Space the file takes on disk (allocated blocks), not its virtual size."""
    mtime: float


@contextmanager
def fs_errors(what: str) -> Iterator[None]:
    """File-system failures become StorageError, a full disk named as such."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"disk full: {what}: {exc.strerror}") from exc
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc
