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

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from vmreplica.errors import InvalidState, StorageError


@contextlib.contextmanager
def exclusive(path: Path, timeout: float) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open lock file {path}: {e.strerror or e}") from e
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise InvalidState(
                        f"{path} is still locked by another node after {timeout:g} s: "
                        "fence that node (power it off) or wait for it"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the POSIX lock
