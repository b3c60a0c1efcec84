"""The agent's allocator tuning (memory.py): threads that allocate and free blocks of a few
hundred KiB give the memory back. Each case runs in a fresh interpreter, since mallopt must come
before the first thread and cannot be undone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vmreplica

PROBE = """
import sys, threading
from vmreplica._internal.memory import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024

def work():
    for _ in range(3):
        blocks = [bytearray(300 * 1024) for _ in range(100)]
        del blocks

threads = [threading.Thread(target=work) for _ in range(8)]
before = rss_mib()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss_mib() - before)
"""


def _growth_mib(mode: str) -> int:
    src = Path(vmreplica.__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(src)},
    )
    return int(done.stdout)


def test_freed_blocks_of_worker_threads_go_back_to_the_kernel() -> None:
    default, tuned = _growth_mib("default"), _growth_mib("tuned")
    assert tuned <= 4, f"tuned allocator kept {tuned} MiB after the threads freed everything"
    # The probe shows the difference: without the tuning glibc keeps what the threads freed.
    assert default >= tuned + 10, (default, tuned)
