"""Bytes on the wire per byte written, for 2,000 random 4 KiB writes on a disk full of random
data, and for 64 MiB of 1 MiB writes, with one delta cycle each; compression on and off.

Run: ``.venv/bin/python bench/bench_small_writes.py [--quick] [--size-gib 4] [--writes 2000]``.

The disk (a VM that is off) is filled with os.urandom data and replicated first; that initial
copy is not counted. The writes go in with one qemu-io run on the closed image, each 4 KiB
block its own fresh random bytes, at distinct 4 KiB-aligned offsets drawn at random. A counting
TCP proxy between the agents (bench_wire.py's) counts what one ``replication sync`` sends, TLS,
HTTP and the delta's qcow2 metadata included. After every cycle the replica's tip must equal
the primary disk (``qemu-img compare``).

Baselines, from the same writes: the bytes written, and what the same cycle would carry in
whole 64 KiB clusters (the delta format's unit before compaction): the distinct clusters the
writes touched, times 64 KiB. The sequential case also times the cycle (``replication sync``,
CLI start-up included), to set beside bench_cycle.py.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CountingProxy,
    GiB,
    MiB,
    Pair,
    compare,
    exit_cleanly_on_sigterm,
    qemu_io_write,
    random_bytes,
    replication_pair,
    run,
    scattered_offsets,
    table,
    timed,
)

KiB = 1024
CLUSTER = 64 * KiB
VM = "smallw"


@dataclass
class Case:
    name: str
    compression: bool
    unit: int
    count: int
    written: int = 0
    clusters: int = 0
    up: int = 0
    delta_file: int = 0
    seconds: float = 0.0


def random_disk(path: Path, size: int) -> None:
    """A qcow2 disk whose every byte is random (written raw, then converted)."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(random_bytes(64 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def run_case(pair: Pair, proxy: CountingProxy, disk: Path, case: Case, size: int,
             rng: random.Random) -> None:  # fmt: skip
    pair.cli("replication", "set", VM, "--compression", str(case.compression).lower())
    offsets = scattered_offsets(size, case.count, case.unit, rng)
    data_dir = pair.base / "data" / case.name.replace(" ", "").replace(",", "-")
    data_dir.mkdir(parents=True, exist_ok=True)
    writes: list[tuple[int, int, int | Path]] = []
    for i, offset in enumerate(offsets):
        source = data_dir / f"w{i}"
        source.write_bytes(random_bytes(case.unit))
        writes.append((offset, case.unit, source))
    qemu_io_write(disk, writes)
    case.written = case.count * case.unit
    case.clusters = len(
        {c for o in offsets for c in range(o // CLUSTER, -(-(o + case.unit) // CLUSTER))}
    )
    proxy.reset()
    case.seconds = timed(lambda: pair.sync(VM))
    case.up = proxy.counts()[0]
    case.delta_file = int(pair.measure(VM)[0]["last_replication_size"])
    if not compare(disk, pair.tip(VM)):
        raise RuntimeError(f"{case.name}: the replica differs from the primary disk")
    print(f"  {case.name}: {case.up / MiB:.1f} MiB up for {case.written / MiB:.1f} MiB written",
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, 500 writes")
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    size, writes = (GiB, 500) if args.quick else (args.size_gib * GiB, args.writes)
    rng = random.Random(args.seed)
    cases = [
        Case("4k random, zstd", True, 4 * KiB, writes),
        Case("4k random, raw", False, 4 * KiB, writes),
        Case("64 x 1M, zstd", True, MiB, 64),
    ]
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(
        f"a {size / GiB:g} GiB disk of random data; {writes} x 4 KiB, then 64 x 1 MiB", flush=True
    )
    with replication_pair() as pair, CountingProxy(pair.port) as proxy:
        disk = pair.base / f"{VM}.qcow2"
        random_disk(disk, size)
        pair.new_vm(VM, disk)
        pair.enable(VM, port=proxy.port)
        pair.start_initial(VM)
        pair.sync(VM)
        for case in cases:
            run_case(pair, proxy, disk, case, size, rng)
    rows: list[list[object]] = []
    for c in cases:
        rows.append([
            c.name, c.written / MiB, c.clusters * CLUSTER / MiB, c.delta_file / MiB, c.up / MiB,
            c.up / c.written, c.clusters * CLUSTER / c.written, c.seconds,
        ])  # fmt: skip
    table(
        ["case", "written MiB", "64K clusters MiB", "delta file MiB", "wire up MiB",
         "wire/written", "clusters/written", "sync s"],
        rows,
    )  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
