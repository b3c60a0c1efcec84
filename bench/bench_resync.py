"""Resynchronization of a VM whose change tracking was lost, agent to agent over TLS on loopback,
next to the tools an operator without change tracking would use, measured in the same run.

Run: ``.venv/bin/python bench/bench_resync.py [--quick] [--disk-gib 4] [--alloc-gib 2]
[--changed 0.05]``.

The disk (VM off, ``vm new --disk-path``) is --disk-gib with --alloc-gib of random data in 64 MiB
pieces spread over it, replicated once. Then, per round, tracking is lost (its bitmaps are
removed with ``qemu-img bitmap --remove``, as a disk edited outside vmreplica would be; the next
``sync`` finds it and the VM waits for a resynchronization), --changed of the allocated data is
overwritten with new random data in 64 KiB writes at random allocated offsets, and
``replication resume VM --resynchronize --wait`` is timed (CLI start-up included). The replica
is checked with ``qemu-img compare``. Round "warm" starts with both sides' disks read once (the replica writes its base with O_DIRECT,
so it would be cold otherwise); round "cold" drops the page cache first
(``/proc/sys/vm/drop_caches``, root only), and so does every cold baseline.

The compare time is the primary agent's own account (its log line "resync of VM finished: N
blocks compared in S s of hashing"): both sides hashing their view at once, batch after batch
(here both agents share this machine's CPUs and disk; two hosts would not).
Baselines, each on the same disks and in the same cache state, in the same round:
- ``cat`` of each side's largest image file to /dev/null (the primary's disk, the replica's
  ``base``): reading the disk once; the target is compare <= 1.25 x the larger of the two. Both
  read one after the other is shown too: on one machine, the two agents share its disk;
- ``rsync -I --inplace --no-whole-file`` from a raw copy of the primary disk onto a raw copy of
  the replica (rsync's delta transfer; making the raw copies is not timed);
- ``qemu-img compare`` of the primary disk and the replica's chain (both read in one process);
- ``qemu-img convert -O qcow2`` of the primary disk, + fsync: the full copy a resynchronization
  avoids.
Bytes on the wire are counted by a TCP proxy between the agents (TLS, HTTP and the replica's
hashes included); the target is at most 1.1 x the differing bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    PRIMARY,
    CountingProxy,
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

BLOCK = 64 << 10
PIECE = 64 * MiB


@dataclass
class Round:
    cache: str
    resync: float = 0.0
    hashing: float = 0.0
    wire: int = 0
    changed: int = 0
    read: float = 0.0
    read_both: float = 0.0
    compare: float = 0.0
    rsync: float = 0.0
    convert: float = 0.0


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def prepared(cache: str, *files: Path) -> None:
    """Cold: nothing in the page cache. Warm: ``files`` read once (the replica writes its base
    with O_DIRECT, so it is not in the cache otherwise)."""
    if cache == "cold":
        drop_caches()
        return
    os.sync()
    for path in files:
        run("sh", "-c", 'cat "$1" >/dev/null', "cat", str(path))


def make_disk(path: Path, size: int, alloc: int, piece: int) -> list[int]:
    """Random data in ``piece``-sized pieces at even strides; returns their offsets."""
    qemu_img_create(path, size)
    count = alloc // piece
    stride = size // count
    offsets = [i * stride for i in range(count)]
    data = path.with_suffix(".random")
    try:
        for offset in offsets:
            data.write_bytes(os.urandom(piece))
            qemu_io_write(path, [(offset, piece, data)])
    finally:
        data.unlink(missing_ok=True)
    return offsets


def lose_tracking(pair: Pair, vm: str, disk: Path) -> None:
    info = json.loads(run("qemu-img", "info", "--output", "json", str(disk)).stdout)
    for bitmap in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
        run("qemu-img", "bitmap", "--remove", str(disk), bitmap["name"])
    refused = pair.cluster.cli("replication", "sync", vm, host=PRIMARY, check=False)
    if refused.returncode != 9:
        raise RuntimeError(f"sync after losing tracking: {refused.returncode} {refused.stderr}")


def change(disk: Path, pieces: list[int], piece: int, fraction: float, rng: random.Random) -> int:
    count = max(1, int(len(pieces) * piece * fraction) // BLOCK)
    blocks = rng.sample(range(len(pieces) * (piece // BLOCK)), count)
    directory = disk.parent / "changes"
    directory.mkdir()
    files = [directory / f"block{i}" for i in range(count)]
    for path in files:
        path.write_bytes(os.urandom(BLOCK))
    try:
        writes = []
        for block, data in zip(blocks, files, strict=True):
            offset = pieces[block // (piece // BLOCK)] + (block % (piece // BLOCK)) * BLOCK
            writes.append((offset, BLOCK, data))
        qemu_io_write(disk, writes)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return count * BLOCK


_FINISHED = re.compile(r"resync of (\S+) finished: \d+ blocks compared in ([\d.]+) s of hashing")


def hashing_seconds(pair: Pair, vm: str) -> float:
    found = None
    for line in (pair.cluster.base / PRIMARY / "agent.log").read_text().splitlines():
        match = _FINISHED.search(json.loads(line).get("message", ""))
        if match and match[1] == vm:
            found = float(match[2])
    if found is None:
        raise RuntimeError("no 'resync of VM finished' line in the primary agent's log")
    return found


def read_once(path: Path, cache: str) -> float:
    prepared(cache)
    return timed(lambda: run("sh", "-c", 'cat "$1" >/dev/null', "cat", str(path)))


def baselines(pair: Pair, vm: str, disk: Path, result: Round) -> None:
    work = disk.parent
    tip = pair.tip(vm)
    base = tip.with_name("base.qcow2")
    primary, replica = read_once(disk, result.cache), read_once(base, result.cache)
    result.read, result.read_both = max(primary, replica), primary + replica
    prepared(result.cache)
    result.compare = timed(lambda: run("qemu-img", "compare", "-U", str(disk), str(tip)))
    before, after = work / "replica.raw", work / "primary.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", str(tip), str(before))
    run("qemu-img", "convert", "-O", "raw", str(disk), str(after))
    prepared(result.cache)
    rsync = ("rsync", "-I", "--inplace", "--no-whole-file", str(after), str(before))
    result.rsync = timed(lambda: run(*rsync))
    before.unlink()
    after.unlink()
    out = work / "convert-out.qcow2"
    prepared(result.cache)

    def convert() -> None:
        run("qemu-img", "convert", "-O", "qcow2", str(disk), str(out))
        fsync_file(out)

    result.convert = timed(convert)
    out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB disk, 256 MiB allocated")
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--alloc-gib", type=float, default=2.0)
    ap.add_argument("--changed", type=float, default=0.05, help="fraction of the allocated data")
    ap.add_argument("--warm-only", action="store_true", help="skip the cold round (not root)")
    args = ap.parse_args()
    size, alloc, piece = int(args.disk_gib * GiB), int(args.alloc_gib * GiB), PIECE
    if args.quick:
        size, alloc, piece = 512 * MiB, 256 * MiB, 16 * MiB
    exit_cleanly_on_sigterm()
    rng = random.Random(9)
    began = time.monotonic()
    print(
        f"resynchronization, VM off: {size / GiB:g} GiB disk, {alloc / GiB:g} GiB allocated, "
        f"{args.changed:.0%} of it changed in 64 KiB writes; {os.cpu_count()} CPUs",
        flush=True,
    )
    rounds = [Round("warm")] + ([] if args.warm_only else [Round("cold")])
    with replication_pair() as pair, CountingProxy(pair.port) as proxy:
        work = pair.base / "disks"
        work.mkdir()
        disk = work / "big.qcow2"
        pieces = make_disk(disk, size, alloc, piece)
        pair.new_vm("big", disk)
        pair.enable("big", port=proxy.port)
        pair.start_initial("big")
        for result in rounds:
            lose_tracking(pair, "big", disk)
            result.changed = change(disk, pieces, piece, args.changed, rng)
            prepared(result.cache, disk, pair.tip("big").with_name("base.qcow2"))
            proxy.reset()
            result.resync = timed(
                lambda: pair.cli("replication", "resume", "big", "--resynchronize", "--wait")
            )
            up, down = proxy.counts()
            result.wire = up + down
            result.hashing = hashing_seconds(pair, "big")
            if pair.state("big") != "Replicating":
                raise RuntimeError(f"state {pair.state('big')} after the resynchronization")
            if not compare(disk, pair.tip("big")):
                raise RuntimeError("the replica differs from the primary disk")
            baselines(pair, "big", disk, result)
            print(f"  {result.cache}: resync {result.resync:.2f} s", flush=True)
    table(
        ["cache", "differing MiB", "wire MiB", "wire/differing", "resync s", "compare s",
         "read s", "compare/read", "read both s", "compare/read both", "rsync s", "rsync/resync",
         "qemu-img compare s", "convert+fsync s", "(convert+fsync)/resync"],
        [[r.cache, r.changed / MiB, r.wire / MiB, r.wire / r.changed, r.resync, r.hashing,
          r.read, r.hashing / r.read, r.read_both, r.hashing / r.read_both, r.rsync,
          r.rsync / r.resync, r.compare, r.convert, r.convert / r.resync] for r in rounds],
    )  # fmt: skip
    print(
        "targets: compare/read <= 1.25, wire/differing <= 1.10; read = the larger side's "
        "file, read both = both sides' files one after the other (what two agents sharing one "
        "machine and one disk must read)"
    )
    print(
        "resync s = the whole `resume --resynchronize --wait` (CLI, both views, the compare, "
        "sending and applying the differing blocks); compare s = hashing alone"
    )
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
