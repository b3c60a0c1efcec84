"""Initial replication of a VM that is off, agent to agent over TLS on loopback, next to
``qemu-img convert -O qcow2`` of the same disk measured in the same run.

Run: ``.venv/bin/python bench/bench_initial.py [--quick] [--repeat 3] [--disk-gib 4] [--alloc-gib 2]``
(or ``--fixed N``: only what a copy costs besides its data, N copies of 16 MiB; ``--data random
--zstd off``: that case alone, the one that matters, for A/B runs on a busy machine).

Each data set is a qcow2 disk of --disk-gib with --alloc-gib allocated as --chunk-mib pieces
spread evenly over it: qemu-io ``write -P`` patterns (compress to almost nothing) and random
bytes (``write -s`` from fresh os.urandom files: the honest case). Each is replicated with
compression on (the default) and off, each time as a new VM (``vm new --disk-path`` on its own
copy of the disk). Timed: the wall time of ``vmreplica replication start-initial VM --wait``
(CLI start-up included), and of the baseline ``qemu-img convert -O qcow2`` of the same disk to a
local file, alone and followed by an fsync of the copy (vmreplica's replica writes with O_DIRECT
and fsyncs before it acknowledges; qemu-img convert by default does neither). Every timing starts after a
``sync``; the disk is warm in the page cache for both. The replica is checked with
``qemu-img compare``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    PRIMARY,
    REPLICA,
    GiB,
    MiB,
    Pair,
    compare,
    exit_cleanly_on_sigterm,
    fsync_file,
    qemu_img_create,
    qemu_io_write,
    replication_pair,
    run,
    table,
    timed,
)


@dataclass(frozen=True)
class Sizes:
    disk: int
    alloc: int
    chunk: int


def make_disk(path: Path, kind: str, sizes: Sizes) -> None:
    """``alloc`` bytes of ``kind`` data in ``chunk`` pieces at even strides over the disk."""
    qemu_img_create(path, sizes.disk)
    count = sizes.alloc // sizes.chunk
    stride = sizes.disk // count
    if kind == "pattern":
        qemu_io_write(path, [(i * stride, sizes.chunk, 0x11 + i % 0xE0) for i in range(count)])
        return
    data = path.with_suffix(".random")
    try:
        for i in range(count):
            data.write_bytes(os.urandom(sizes.chunk))
            qemu_io_write(path, [(i * stride, sizes.chunk, data)])
    finally:
        data.unlink(missing_ok=True)


def baseline(disk: Path, out: Path) -> tuple[float, float]:
    """Seconds of ``qemu-img convert -O qcow2``, and of the same followed by an fsync."""
    plain = timed(lambda: run("qemu-img", "convert", "-O", "qcow2", str(disk), str(out)))
    out.unlink()

    def synced() -> None:
        run("qemu-img", "convert", "-O", "qcow2", str(disk), str(out))
        fsync_file(out)

    with_fsync = timed(synced)
    out.unlink()
    return plain, with_fsync


PHASES = ("prepare", "copy", "finish")
_PHASE_RE = re.compile(r"initial copy of (\S+): " + ", ".join(rf"{p} ([\d.]+) s" for p in PHASES))


def phases(pair: Pair, vm: str) -> list[float] | None:
    """The primary agent's own account of the copy (its log line "initial copy of VM: ...").

    prepare = the replica creates its images and NBD server while the primary starts tracking
    (and, for a running VM, its point-in-time export); copy = qemu-img convert over NBD+TLS;
    finish = the replica closes, syncs and adopts the images as the chain's base.
    """
    found = None
    for message in _messages(pair, PRIMARY):
        if (match := _PHASE_RE.search(message)) and match[1] == vm:
            found = [float(match[i + 2]) for i in range(len(PHASES))]
    return found


def laps(pair: Pair, vm: str) -> str:
    """The steps inside the phases, as both agents log them (agents since these laps)."""
    found = {}
    for host, pattern in ((PRIMARY, r" s \((.*)\)$"), (REPLICA, r"port \d+ \((.*)\)$")):
        for message in _messages(pair, host):
            if message.startswith(f"initial copy of {vm}: ") and (m := re.search(pattern, message)):
                found[host] = m[1]
    if PRIMARY not in found:
        return "n/a"
    return f"{found[PRIMARY]}; replica's open: {found.get(REPLICA, 'n/a')}"


def _messages(pair: Pair, host: str) -> list[str]:
    log = pair.cluster.base / host / "agent.log"
    return [json.loads(line).get("message", "") for line in log.read_text().splitlines()]


def replicate(
    pair: Pair, vm: str, disk: Path, compression: bool
) -> tuple[float, list[float] | None, str]:
    pair.new_vm(vm, disk)
    pair.enable(vm, "--compression", "true" if compression else "false")
    os.sync()
    began = time.perf_counter()
    pair.start_initial(vm)
    seconds = time.perf_counter() - began
    state = pair.state(vm)
    if state != "Replicating":
        raise RuntimeError(f"{vm}: state {state} after start-initial --wait")
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs from the primary disk")
    return seconds, phases(pair, vm), laps(pair, vm)


def fixed_cost(runs: int) -> None:
    """What a copy costs besides moving its data: ``start-initial --wait`` of a 1 GiB disk with
    16 MiB allocated, ``runs`` times (a new VM each), next to a no-op CLI call."""
    sizes = Sizes(GiB, 16 * MiB, MiB)
    with replication_pair() as pair:
        disks = pair.base / "disks"
        disks.mkdir()
        source = disks / "small.qcow2"
        make_disk(source, "pattern", sizes)
        noop = min(timed(lambda: pair.cli("server", "get")) for _ in range(3))
        times = []
        for n in range(runs):
            vm, disk = f"fixed-{n}", disks / f"fixed-{n}.qcow2"
            shutil.copyfile(source, disk)
            seconds, split, steps = replicate(pair, vm, disk, compression=False)
            times.append(seconds)
            print(f"  {vm}: {seconds:.2f} s; prepare/copy/finish {split}; {steps}", flush=True)
            pair.forget(vm, disk)
    times.sort()
    print(
        f"fixed cost of start-initial --wait: min {times[0]:.2f} s, median "
        f"{times[len(times) // 2]:.2f} s over {runs}; a no-op CLI call {noop:.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB disk, 256 MiB allocated")
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--alloc-gib", type=float, default=2.0)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case; the best is shown")
    ap.add_argument("--data", choices=("pattern", "random", "both"), default="both")
    ap.add_argument("--zstd", choices=("on", "off", "both"), default="both", help="compression")
    ap.add_argument(
        "--fixed", type=int, metavar="N", help="only the fixed cost: N copies of 16 MiB of data"
    )
    args = ap.parse_args()
    if args.fixed:
        exit_cleanly_on_sigterm()
        fixed_cost(args.fixed)
        return
    sizes = Sizes(int(args.disk_gib * GiB), int(args.alloc_gib * GiB), args.chunk_mib * MiB)
    if args.quick:
        sizes = Sizes(512 * MiB, 256 * MiB, 16 * MiB)
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(
        f"initial replication, VM off: {sizes.disk / GiB:g} GiB disk, {sizes.alloc / GiB:g} GiB "
        f"allocated in {sizes.chunk // MiB} MiB pieces; {os.cpu_count()} CPUs",
        flush=True,
    )
    rows: list[list[object]] = []
    split_rows: list[list[object]] = []
    with replication_pair() as pair:
        disks = pair.base / "disks"
        disks.mkdir()
        for kind in ("pattern", "random") if args.data == "both" else (args.data,):
            source = disks / f"{kind}.qcow2"
            make_disk(source, kind, sizes)
            runs = [baseline(source, disks / "convert-out.qcow2") for _ in range(args.repeat)]
            plain, synced = min(r[0] for r in runs), min(r[1] for r in runs)
            for compression in {"both": (True, False), "on": (True,), "off": (False,)}[args.zstd]:
                best: tuple[float, list[float] | None, str] | None = None
                for n in range(args.repeat):
                    vm = f"{kind}-{'z' if compression else 'raw'}-{n}"
                    disk = disks / f"{vm}.qcow2"
                    shutil.copyfile(source, disk)
                    result = replicate(pair, vm, disk, compression)
                    print(f"  {vm}: {result[0]:.2f} s ({result[2]})", flush=True)
                    pair.forget(vm, disk)
                    if best is None or result[0] < best[0]:
                        best = result
                assert best is not None
                seconds, split, _ = best
                zstd = "on" if compression else "off"
                rows.append([
                    kind, zstd, seconds, plain, synced, plain / seconds, synced / seconds,
                    sizes.alloc / MiB / seconds,
                ])  # fmt: skip
                rest = seconds - sum(split) if split else None
                split_rows.append([kind, zstd, *(split or ("n/a",) * len(PHASES)), rest or "n/a"])
            source.unlink()
    table(
        ["data", "zstd", "vmreplica s", "convert s", "convert+fsync s",
         "convert/vmr", "(convert+fsync)/vmr", "vmr MiB/s"],
        rows,
    )  # fmt: skip
    print("target: convert/vmr >= 0.80 (vmreplica at most 25% slower than qemu-img convert)")
    print()
    print("where the time goes (primary agent log; other = CLI start-up, scheduling, polling):")
    table(["data", "zstd", *(f"{p} s" for p in PHASES), "other s"], split_rows)
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
