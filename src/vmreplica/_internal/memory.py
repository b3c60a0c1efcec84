"""glibc's allocator, tuned for a long-lived agent of many VMs.

By default glibc gives every thread that allocates its own arena (up to 8 per core) and raises
its mmap threshold each time a large block is freed, so the agent's buffers of a few hundred KiB
(delta chunks, TLS records, zstd frames), allocated from asyncio's worker threads, end up in
arenas that keep the freed memory: the resident size grew with the number of VMs although the
live objects did not (tracemalloc: a few MiB). Two arenas, and fixed mmap and trim thresholds,
return those blocks to the kernel when they are freed.

Measured with bench/bench_cpu.py --vms 30 --seconds 90 (VMs off), the same tunables set through
GLIBC_TUNABLES in the second of two back-to-back runs: peak RSS primary 131 -> 90 MiB, replica
132 -> 98 MiB, CPU per cycle within noise.

The mmap threshold is above the largest buffer a delta passes through (a 16 MiB block, the
receiver's 16 MiB read-ahead): below it every 4 MiB piece read, compressed, decrypted or
decompressed was a fresh mmap, zeroed by the kernel page by page and unmapped again: 41% of the
replica's CPU samples in a compressed initial copy (perf: page faults under memmove, munmap,
mremap; bench/README.md). The heap keeps what a delta freed for the next piece instead: up to
TRIM_THRESHOLD free at the top of each arena (then it is trimmed to TOP_PAD), and :func:`trim`,
called once a delta is sent or staged, gives back what it can (tests/unit/test_memory.py's
probe: 8 to 30 MiB left of about 60 after 8 threads freed 240 MiB; glibc's defaults left 28).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENAS = 2
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 32 << 20
TOP_PAD = 8 << 20
_libc: ctypes.CDLL | None = None  # set by tune_allocator


def tune_allocator() -> bool:
    """Set the agent's allocator parameters; call before any thread starts. False where the C
    library is not glibc (the defaults then stay, nothing else changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: the allocator keeps its defaults")
        return False
    global _libc
    _libc = libc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_ARENA_MAX, ARENAS),
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    if not done:
        log.warning("mallopt refused a parameter: the allocator keeps some of its defaults")
    return done


def trim() -> None:
    """Give the heap's free memory back to the kernel (after a delta's pieces were freed); a
    no-op where :func:`tune_allocator` did not run or the C library is not glibc."""
    if _libc is not None:
        with contextlib.suppress(AttributeError):
            _libc.malloc_trim(0)
