"""Bytes on the wire per byte changed for one delta cycle, random and text-like data, next to
``zstd -1`` of the same changed bytes computed in the same run.

Run: ``.venv/bin/python bench/bench_wire.py [--quick] [--change-mib 64]``.

A counting TCP proxy (in this process) sits between the primary and the replica's certificate
listener: replication is enabled with ``--replica-port`` set to the proxy's port (the primary
still resolves the replica's name to 127.0.0.1 and checks its certificate by name, so TLS passes
through untouched). For each data kind a VM that is off, with a 1 GiB sparse disk, replicates
with compression on; its initial replication is not counted. Then --change-mib of data is
written as 1 MiB writes at random offsets with qemu-io, and the bytes that cross the proxy
during one ``replication sync`` are counted, each way (TLS records, HTTP and the delta's qcow2
metadata included). An empty cycle is counted too: the fixed cost of a cycle on the wire.

Baselines, on the exact bytes written: their raw size, and python-zstandard level 1 (what
``zstd -1`` does) of their concatenation. Text-like data is log lines from a small vocabulary
with a time stamp and a fresh random id on every line; random data is os.urandom.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import zstandard
from benchlib import (
    CHUNK,
    CountingProxy,
    GiB,
    MiB,
    Pair,
    compare,
    exit_cleanly_on_sigterm,
    qemu_img_create,
    qemu_io_write,
    random_bytes,
    replication_pair,
    scattered_offsets,
    table,
    text_bytes,
    write_data_files,
)


@dataclass
class Case:
    kind: str
    compression: bool
    make: Callable[[int], bytes]
    changed: int = 0
    zstd: int = 0
    delta_file: int = 0
    up: int = 0
    down: int = 0
    empty_up: int = 0


def run_case(
    pair: Pair, proxy: CountingProxy, case: Case, size: int, count: int, rng: random.Random
) -> None:
    vm = f"wire-{case.kind}-{'z' if case.compression else 'raw'}"
    disk = pair.base / f"{vm}.qcow2"
    qemu_img_create(disk, size)
    pair.new_vm(vm, disk)
    pair.enable(vm, "--compression", str(case.compression).lower(), port=proxy.port)
    pair.start_initial(vm)

    proxy.reset()
    pair.sync(vm)
    case.empty_up = proxy.counts()[0]

    files = write_data_files(pair.base / "data" / vm, count, case.make)
    qemu_io_write(
        disk, [(off, CHUNK, f) for off, f in zip(scattered_offsets(size, count, CHUNK, rng), files, strict=True)]
    )  # fmt: skip
    changed = b"".join(f.read_bytes() for f in files)
    case.changed = len(changed)
    case.zstd = len(zstandard.ZstdCompressor(level=1).compress(changed))

    proxy.reset()
    pair.sync(vm)
    case.up, case.down = proxy.counts()
    case.delta_file = int(pair.measure(vm)[0]["last_replication_size"])
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs from the primary disk")
    print(
        f"  {vm}: {case.up / MiB:.1f} MiB up for {case.changed / MiB:.0f} MiB changed", flush=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB disk, 8 MiB changed")
    ap.add_argument("--change-mib", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    size, count = (256 * MiB, 8) if args.quick else (GiB, args.change_mib)
    rng = random.Random(args.seed)
    text = functools.partial(text_bytes, rng=random.Random(args.seed))
    cases = [
        Case("random", True, random_bytes),
        Case("text", True, text),
        Case("text", False, text),
    ]
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(f"bytes on the wire for {count} x 1 MiB writes on a {size / GiB:g} GiB disk", flush=True)
    with replication_pair() as pair, CountingProxy(pair.port) as proxy:
        for case in cases:
            run_case(pair, proxy, case, size, count, rng)
    rows: list[list[object]] = []
    for c in cases:
        rows.append([
            c.kind, "on" if c.compression else "off", c.changed / MiB, c.delta_file / MiB,
            c.up / MiB, c.down / 1024, c.zstd / MiB, c.up / c.changed, c.zstd / c.changed,
            c.up / c.zstd, c.empty_up / 1024,
        ])  # fmt: skip
    table(
        ["data", "zstd", "changed MiB", "delta file MiB", "wire up MiB", "wire down KiB",
         "zstd -1 MiB", "wire/changed", "zstd/changed", "wire/zstd", "empty cycle up KiB"],
        rows,
    )  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
