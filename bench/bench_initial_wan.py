"""The first copy over a WAN: initial replication of a VM that is off, between two sites in
network namespaces joined by a veth pair whose rate ``tc tbf`` caps, next to the raw transfer
time of the same bytes and ``qemu-img convert`` + fsync, measured in the same run.

Run: ``.venv/bin/python bench/bench_initial_wan.py [--quick] [--rates 100M,1G,0]`` (as root:
it makes network namespaces). About 8 minutes; ``--quick``: 512 MiB allocated, about 2.

The disk is --disk-gib (4) with --alloc-gib (2) allocated in 64 MiB pieces at even strides,
half random bytes and half text-like log lines (``benchlib.text_bytes``). For each rate it is
replicated twice, each time as a new VM on its own copy of the disk: ``start-initial --wait``
(one NBD copy by ``qemu-img convert``, uncompressed) and ``start-initial --compressed --wait``
(zstd deltas of the blocks that are not zero). Timed: the wall time of the command (CLI start-up
included). Counted: the bytes the primary's end of the link sent (``tx_bytes``), and the CPU time of
each agent and of the children it reaped (qemu-img, qemu-nbd) during the command. The raw transfer
time is allocated bytes x 8 / rate: what an uncompressed copy needs at best on that link. The
target is at most 0.7 of it. Rate 0 is the link without a cap (veth between namespaces, which
is what loopback is here), compared with ``qemu-img convert -O qcow2`` + fsync of the disk (target:
convert+fsync / vmreplica at least 0.6). The replica is checked with ``qemu-img compare``.

This kernel has no ``sch_netem``, so the link has no added delay or loss: tbf caps the rate.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
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
    process_cpu,
    qemu_img_create,
    qemu_io_write,
    replication_pair,
    run,
    table,
    text_bytes,
    timed,
)

from tests.localcluster import Site
from tests.wan import VethLink

METHODS = {"nbd": (), "compressed": ("--compressed",)}


def parse_rate(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def make_disk(path: Path, disk: int, alloc: int, chunk: int) -> None:
    """``alloc`` bytes in ``chunk`` pieces at even strides; even pieces random, odd ones text."""
    qemu_img_create(path, disk)
    count = alloc // chunk
    stride = disk // count
    rng = random.Random(1)
    data = path.with_suffix(".piece")
    try:
        for i in range(count):
            data.write_bytes(os.urandom(chunk) if i % 2 == 0 else text_bytes(chunk, rng))
            qemu_io_write(path, [(i * stride, chunk, data)])
    finally:
        data.unlink(missing_ok=True)


def convert_fsync(disk: Path, out: Path) -> float:
    def synced() -> None:
        run("qemu-img", "convert", "-O", "qcow2", str(disk), str(out))
        fsync_file(out)

    seconds = timed(synced)
    out.unlink()
    return seconds


def replicate(pair: Pair, link: VethLink, vm: str, disk: Path, method: str) -> tuple[float, int]:
    pair.new_vm(vm, disk)
    pair.enable(vm)
    os.sync()
    agents = {host: pair.agent_pid(host) for host in (PRIMARY, REPLICA)}
    cpu = {host: process_cpu(pid) for host, pid in agents.items()}
    before = link.sent("a")
    began = time.perf_counter()
    pair.cli("replication", "start-initial", vm, *METHODS[method], "--wait", timeout=3600)
    seconds = time.perf_counter() - began
    sent = link.sent("a") - before
    used = {host: process_cpu(pid) - cpu[host] for host, pid in agents.items()}
    print(f"  {vm}: CPU s, agent + its children: primary {used[PRIMARY].own:.2f} + "
          f"{used[PRIMARY].children:.2f}, replica {used[REPLICA].own:.2f} + "
          f"{used[REPLICA].children:.2f}", flush=True)  # fmt: skip
    if (state := pair.state(vm)) != "Replicating":
        raise RuntimeError(f"{vm}: state {state} after start-initial --wait")
    pair.sync(vm)  # the cycle right after may be applying: let it end before reading the tip
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs from the primary disk")
    return seconds, sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, 512 MiB allocated")
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--alloc-gib", type=float, default=2.0)
    ap.add_argument("--rates", default="100M,1G,0", help="link caps in bit/s; 0: none")
    ap.add_argument("--methods", default="nbd,compressed")
    args = ap.parse_args()
    disk_size, alloc = int(args.disk_gib * GiB), int(args.alloc_gib * GiB)
    if args.quick:
        disk_size, alloc = 1 * GiB, 512 * MiB
    chunk = 64 * MiB if alloc >= 1 * GiB else 16 * MiB
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(f"initial copy over a capped link, VM off: {disk_size / GiB:g} GiB disk, "
          f"{alloc / GiB:g} GiB allocated (half random, half text); {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    rows: list[list[object]] = []
    link = VethLink.start()
    try:
        sites = {PRIMARY: Site(tuple(link.prefix("a")), link.address("a")),
                 REPLICA: Site(tuple(link.prefix("b")), link.address("b"))}  # fmt: skip
        with replication_pair(sites=sites) as pair:
            disks = pair.base / "disks"
            disks.mkdir()
            source = disks / "source.qcow2"
            make_disk(source, disk_size, alloc, chunk)
            synced = convert_fsync(source, disks / "convert-out.qcow2")
            print(f"  qemu-img convert + fsync: {synced:.2f} s", flush=True)
            for rate_text in args.rates.split(","):
                rate = parse_rate(rate_text)
                link.shape(rate)
                raw = alloc * 8 / rate if rate else None
                for method in args.methods.split(","):
                    vm = f"{method}-{rate_text}"
                    disk = disks / f"{vm}.qcow2"
                    shutil.copyfile(source, disk)
                    seconds, sent = replicate(pair, link, vm, disk, method)
                    pair.forget(vm, disk)
                    print(f"  {vm}: {seconds:.2f} s, {sent / MiB:.0f} MiB on the link "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
                    rows.append([
                        rate_text if rate else "none", method, seconds, sent / MiB,
                        sent / alloc, raw if raw else "n/a",
                        seconds / raw if raw else "n/a", synced / seconds,
                    ])  # fmt: skip
            link.shape(0)
    finally:
        link.stop()
    table(
        ["link cap", "method", "vmreplica s", "link MiB", "link/allocated", "raw transfer s",
         "vmr/raw", "(convert+fsync)/vmr"],
        rows,
    )  # fmt: skip
    print("targets: vmr/raw <= 0.7 on a capped link; (convert+fsync)/vmr >= 0.6 uncapped")
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
