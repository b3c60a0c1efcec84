"""A delta body that the HTTP client drops half sent (the connection broke) is closed by the
garbage collector, later, inside the event loop. That close must not wait on the stream's
worker thread, which may be gone by then: it hung a whole agent (every management call timed
out) after a cut initial copy. This reproduces the collector's order of events for real."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import uuid
from pathlib import Path

from vmreplica._internal.transport import delta as wire

MiB = 1 << 20


def test_a_dropped_body_collected_in_a_cycle_does_not_block_the_loop(tmp_path: Path) -> None:
    (tmp_path / "disk0.qcow2").write_bytes(os.urandom(5 * wire.CHUNK))
    finished = threading.Event()

    async def main() -> None:
        m = await wire.build_manifest(tmp_path, str(uuid.uuid4()), 1, "CrashConsistent", "zstd")
        body = wire.iter_stream(tmp_path, m)
        await body.__anext__()  # the manifest
        await body.__anext__()  # a first piece: the worker now reads the next one
        await asyncio.sleep(0.2)
        cycle: list[object] = [body]
        cycle.append(cycle)  # as an exception's traceback holds a dropped request body
        del body, cycle
        gc.collect()  # the finalizer schedules the body's aclose() on this loop
        for _ in range(20):  # the loop must go on turning
            await asyncio.sleep(0.05)
        finished.set()

    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(30)
    assert finished.is_set(), "the event loop blocked while closing a dropped delta body"
