"""Throughput of the delta wire format, next to the plain tools it competes with.

Run: ``python bench/bench_delta_format.py [--size-mib 256] [--repeat 3] [--dir DIR]``.

For random and text-like data it times build_manifest (hashing), then iter_stream piped straight
into receive in one process (no network: the format's own cost), with compression off and on.
The baselines run in the same process on the same files: ``shutil.copyfile`` for "none", and
``zstd -1 | zstd -d`` (python-zstandard one-shot when the command is missing) for "zstd". Every
path ends with an fsync so they are comparable; each figure is the best of --repeat runs, each
run starting after ``sync`` because write-back of the previous run otherwise throttles the next.
Sources are warm in the page cache, as they are on a primary right after QEMU wrote them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import zstandard

from vmreplica._internal.transport.delta import CHUNK, build_manifest, iter_stream
from vmreplica._internal.transport.delta_receive import receive

MB = 1e6
VM = "bench-vm"


def make_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // CHUNK):
            f.write(os.urandom(CHUNK))


def make_text_like(path: Path, size: int) -> None:
    """Log-like lines: words from a small vocabulary plus a fresh random id on every line."""
    r = random.Random(42)
    words = ["kernel", "systemd", "eth0", "link", "up", "down", "session", "user", "root", "ssh"]
    lines = [
        f"host {' '.join(r.choices(words, k=6))} pid={r.randrange(1 << 16)} id=".encode()
        for _ in range(20000)
    ]
    per_chunk = CHUNK // 48
    with path.open("wb") as f:
        for _ in range(size // CHUNK):
            ids = os.urandom(per_chunk * 6).hex().encode()
            picked = r.choices(lines, k=per_chunk)
            block = b"".join(
                line + ids[i * 12 : i * 12 + 12] + b"\n" for i, line in enumerate(picked)
            )
            f.write(block[:CHUNK].ljust(CHUNK, b"\n"))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def best_of(repeat: int, run: Callable[[], object], cleanup: Callable[[], object]) -> float:
    """Fastest of `repeat` runs, in seconds; `cleanup` and a sync happen outside the clock."""
    best = float("inf")
    for _ in range(repeat):
        os.sync()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        cleanup()
    return best


def hash_delta(src: Path) -> None:
    asyncio.run(build_manifest(src, VM, 1, "CrashConsistent", "none"))


def delta_path(src: Path, stage: Path, compression: str, repeat: int) -> tuple[float, int]:
    """Seconds for one delta through the format, and its size on the wire."""
    manifest = asyncio.run(build_manifest(src, VM, 1, "CrashConsistent", compression))
    wire = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal wire
        wire = 0
        async for piece in iter_stream(src, manifest):
            wire += len(piece)
            yield piece

    def run() -> None:
        asyncio.run(receive(counted(), stage, expected_vm_id=VM))

    return best_of(repeat, run, lambda: shutil.rmtree(stage)), wire


def copy_path(src: Path, dst: Path, repeat: int) -> float:
    def run() -> None:
        shutil.copyfile(src, dst)
        fsync_file(dst)

    return best_of(repeat, run, dst.unlink)


def zstd_path(src: Path, dst: Path, repeat: int) -> tuple[float, int, str]:
    """zstd -1 through a pipe, keeping the compressed stream aside to measure it."""
    packed = dst.with_suffix(".zst")

    def cleanup() -> None:
        dst.unlink()
        packed.unlink(missing_ok=True)

    if shutil.which("zstd"):
        cmd = ["sh", "-c", 'zstd -1 -q -c "$1" | tee "$2" | zstd -d -q -c > "$3"', "sh"]

        def run_cli() -> None:
            subprocess.run([*cmd, str(src), str(packed), str(dst)], check=True)
            fsync_file(dst)

        run_cli()
        wire = packed.stat().st_size
        cleanup()
        return best_of(repeat, run_cli, cleanup), wire, "zstd -1 | zstd -d"
    wire = 0

    def run_lib() -> None:
        nonlocal wire
        data = zstandard.ZstdCompressor(level=1).compress(src.read_bytes())
        wire = len(data)
        dst.write_bytes(zstandard.ZstdDecompressor().decompress(data))
        fsync_file(dst)

    return best_of(repeat, run_lib, cleanup), wire, "python zstandard one-shot"


def row(kind: str, name: str, rate: float, ratio: str = "", vs: str = "") -> None:
    print(f"{kind:<7} {name:<30} {rate / MB:>7.0f} {ratio:>9} {vs:>12}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: $TMPDIR)")
    args = ap.parse_args()
    size: int = args.size_mib << 20
    repeat: int = args.repeat
    with tempfile.TemporaryDirectory(prefix="vmr-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{args.size_mib} MiB per data set, {os.cpu_count()} CPUs, best of {repeat}")
        print(f"{'data':<7} {'path':<30} {'MB/s':>7} {'wire/raw':>9} {'vs baseline':>12}")
        for kind, make in (("random", make_random), ("text", make_text_like)):
            src = root / kind
            src.mkdir()
            disk = src / "disk0.qcow2"
            make(disk, size)
            hashing = best_of(repeat, functools.partial(hash_delta, src), lambda: None)
            row(kind, "build_manifest (blake3)", size / hashing)
            copy = copy_path(disk, root / "copy", repeat)
            row(kind, "baseline copyfile", size / copy, "1.000")
            z_sec, z_wire, z_name = zstd_path(disk, root / "zcopy", repeat)
            row(kind, f"baseline {z_name}", size / z_sec, f"{z_wire / size:.3f}")
            for compression, base in (("none", copy), ("zstd", z_sec)):
                sec, wire = delta_path(src, root / "stage", compression, repeat)
                ratio, vs = f"{wire / size:.3f}", f"{base / sec:.2f}x"
                row(kind, f"delta format, {compression}", size / sec, ratio, vs)
            shutil.rmtree(src)


if __name__ == "__main__":
    main()
