"""The second fence: a POSIX lock on a file in the VM's shared storage, held around each write.

The lease fence (`fence.py`) checks before a write; a node frozen between its check and its
write (SIGSTOP, a VM pause, a long GC) could still write after its lease expired. Holding this
lock across check-and-write serializes the two owners instead: the new owner cannot write until
the old one has finished (and, checking again, stopped). POSIX (`fcntl`) locks are what NFS
(NLM, NFSv4) and SMB (with `nobrl` off) carry between hosts; a killed process's lock is freed by
the kernel, on NFS when the client's lease ends. A lock held by a node that is frozen and never
comes back blocks the takeover: the caller waits `timeout`, then reports it (safety over
liveness: fence that node, e.g. by power, and the lock is freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from vmreplica.errors import InvalidState, StorageError

# In a VM's replica storage directory: the file whose lock the writing node holds.
LOCK_FILE = "cluster.lock"


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open lock file {path}: {e.strerror or e}") from e


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _held_elsewhere(path: Path, timeout: float) -> InvalidState:
    return InvalidState(
        f"{path} is still locked by another node after {timeout:g} s: "
        "fence that node (power it off) or wait for it"
    )


@contextlib.contextmanager
def exclusive(path: Path, timeout: float) -> Iterator[None]:
    """The lock, for a thread (the test nodes)."""
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise _held_elsewhere(path, timeout)
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the POSIX lock


@contextlib.asynccontextmanager
async def exclusive_async(path: Path, timeout: float) -> AsyncIterator[None]:
    """The lock, on the event loop: each try is non-blocking, the waits are asyncio's (a
    cancelled wait leaves no lock behind, as a thread blocked in lockf would)."""
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise _held_elsewhere(path, timeout)
            await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)
