"""A delta cycle carrying --change-mib of scattered random writes, on a small and on a large
disk, next to ``rsync --inplace --no-whole-file`` of the same change measured in the same run.

Run: ``.venv/bin/python bench/bench_cycle.py [--quick] [--cycles 3] [--change-mib 64]``.

For each disk size (1 GiB and 16 GiB, both sparse qcow2 and empty but for the change) a VM that
is off replicates to the replica agent over TLS on loopback. Each cycle writes --change-mib of
random data as 1 MiB writes at random 1 MiB-aligned offsets with qemu-io on the image (qemu-io
goes through QEMU's block layer, so the image's enabled persistent bitmap records the writes; the
replica is checked with ``qemu-img compare`` after every cycle), then times the wall time of
``vmreplica replication sync VM`` (CLI start-up included; a no-op CLI call and an empty cycle
are timed too, to show the fixed cost). The cycle time must not grow with the disk: the table
shows t(large)/t(small).

Baseline, once per disk size: two raw copies made with ``qemu-img convert`` before and after a
change of the same shape, then the timed ``rsync -I --inplace --no-whole-file after before``
(rsync's delta transfer: it reads both whole files, as any tool without change tracking must).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    CHUNK,
    GiB,
    MiB,
    Pair,
    compare,
    exit_cleanly_on_sigterm,
    qemu_img_create,
    qemu_io_write,
    random_bytes,
    replication_pair,
    run,
    scattered_offsets,
    table,
    timed,
    write_data_files,
)


def change(disk: Path, size: int, data: Path, count: int, rng: random.Random) -> None:
    """``count`` MiB of fresh random data as 1 MiB writes at random offsets, through qemu-io."""
    files = write_data_files(data, count, random_bytes)
    offsets = scattered_offsets(size, count, CHUNK, rng)
    qemu_io_write(disk, [(off, CHUNK, f) for off, f in zip(offsets, files, strict=True)])


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


@dataclass
class Case:
    label: str
    size: int
    vm: str
    disk: Path
    empty: float = 0.0
    cycles: list[float] = field(default_factory=list)
    delta_bytes: list[int] = field(default_factory=list)
    rsync: float = 0.0


def run_case(pair: Pair, case: Case, cycles: int, count: int, rng: random.Random) -> None:
    data = pair.base / "data"
    qemu_img_create(case.disk, case.size)
    pair.new_vm(case.vm, case.disk)
    pair.enable(case.vm)
    pair.start_initial(case.vm)
    case.empty = timed(lambda: pair.sync(case.vm))
    for n in range(cycles):
        if n == 0:
            # The baseline carries exactly this first change, between raw copies of the disk.
            before, after = (
                case.disk.with_suffix(".before.raw"),
                case.disk.with_suffix(".after.raw"),
            )
            try:
                run("qemu-img", "convert", "-O", "raw", str(case.disk), str(before))
                change(case.disk, case.size, data, count, rng)
                run("qemu-img", "convert", "-O", "raw", str(case.disk), str(after))
                rsync = ("rsync", "-I", "--inplace", "--no-whole-file", str(after), str(before))
                case.rsync = timed(functools.partial(run, *rsync))
                if not same_bytes(before, after):
                    raise RuntimeError("rsync left the raw copies different")
            finally:
                before.unlink(missing_ok=True)
                after.unlink(missing_ok=True)
        else:
            change(case.disk, case.size, data, count, rng)
        case.cycles.append(timed(lambda: pair.sync(case.vm)))
        case.delta_bytes.append(int(pair.measure(case.vm)[0]["last_replication_size"]))
        if not compare(case.disk, pair.tip(case.vm)):
            raise RuntimeError(f"{case.vm}: the replica differs after cycle {n + 1}")
        print(f"  {case.label}: cycle {n + 1} {case.cycles[-1]:.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 and 512 MiB disks, 8 MiB, 1 cycle")
    ap.add_argument("--cycles", type=int, default=3, help="timed cycles per disk (median shown)")
    ap.add_argument("--change-mib", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sizes = {"1 GiB": GiB, "16 GiB": 16 * GiB}
    count, cycles = args.change_mib, args.cycles
    if args.quick:
        sizes, count, cycles = {"64 MiB": 64 * MiB, "512 MiB": 512 * MiB}, 8, 1
    rng = random.Random(args.seed)
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(
        f"delta cycle of {count} x 1 MiB random writes, VM off; {os.cpu_count()} CPUs", flush=True
    )
    with replication_pair() as pair:
        disks = pair.base / "disks"
        disks.mkdir()
        cli = statistics.median(timed(lambda: pair.cli("replication", "get")) for _ in range(3))
        cases = [
            Case(label, size, f"cycle{i}", disks / f"cycle{i}.qcow2")
            for i, (label, size) in enumerate(sizes.items())
        ]
        for case in cases:
            run_case(pair, case, cycles, count, rng)
    small = statistics.median(cases[0].cycles)
    rows: list[list[object]] = []
    for case in cases:
        t = statistics.median(case.cycles)
        rows.append([
            case.label, case.empty, t, statistics.median(case.delta_bytes) / MiB, case.rsync,
            case.rsync / t, t / small,
        ])  # fmt: skip
    table(
        ["disk", "empty sync s", "sync s (median)", "delta MiB", "rsync s", "rsync/sync",
         "t/t(small)"],
        rows,
    )  # fmt: skip
    print(f"a no-op CLI call (replication get) takes {cli:.2f} s of every sync above")
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
