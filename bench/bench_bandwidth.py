"""Bandwidth caps: the rate measured on the link (a counting proxy between the agents) against
the cap set with ``--max-bandwidth``, for an initial copy (QEMU's throttle) and for a delta
(vmreplica's token bucket), at 10M, 100M and 1G.

Run: ``.venv/bin/python bench/bench_bandwidth.py [--seconds 5]``.

For each cap a VM that is off gets ``cap × --seconds`` bytes of random data (qemu-io on the closed
image), is enabled with that cap and compression off, and replicated (``start-initial --wait``);
then as many bytes again are written elsewhere and one cycle runs (``sync``). A delta's rate is
the bytes the proxy forwarded towards the replica from one second after the first byte to the
last, divided by that time (a throttle lets its first burst through at once; the 1 s settle
keeps it out of a sustained rate). The initial copy goes over NBD straight to the replica, not
through the proxy: its rate is the same, taken from tcp_info's bytes_sent of qemu-img's
connection (``ss -ti``, sampled every 50 ms; tests/integration/peer_tools.ConvertSampler). The baseline, measured in the same run, is the same initial copy and cycle with no cap:
what the link and the machine allow, which a cap can only approach from below.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from benchlib import (
    CountingProxy,
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
    write_data_files,
)

from tests.integration.peer_tools import ConvertSampler

CAPS = (("10M", 10**7), ("100M", 10**8), ("1G", 10**9), ("none", 0))
GiB_DISK = 4 << 30


def write_random(disk: Path, data_dir: Path, total: int, rng: random.Random) -> None:
    count = max(1, total // MiB)
    files = write_data_files(data_dir, count, random_bytes)
    offsets = scattered_offsets(GiB_DISK, count, MiB, rng)
    qemu_io_write(disk, [(off, MiB, f) for off, f in zip(offsets, files, strict=True)])


def one_cap(pair: Pair, proxy: CountingProxy, label: str, cap: int, seconds: float,
            rng: random.Random) -> tuple[float, float, int]:  # fmt: skip
    total = int((cap or 10**9) / 8 * seconds)
    vm = f"bw-{label}"
    disk = pair.base / f"{vm}.qcow2"
    qemu_img_create(disk, GiB_DISK)
    write_random(disk, pair.base / "data", total, rng)
    pair.new_vm(vm, disk)
    pair.enable(vm, "--compression", "false", "--max-bandwidth", str(cap), port=proxy.port)
    sampler = ConvertSampler(str(pair.base))  # the copy is QEMU's NBD: it does not pass the proxy
    sampler.start()
    try:
        pair.start_initial(vm)
    finally:
        sampler.stop.set()
        sampler.join()
    initial = sampler.rate()[1]
    write_random(disk, pair.base / "data", total, rng)
    proxy.reset()
    pair.sync(vm)
    delta = proxy.upstream_rate()
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs from the primary")
    for host in ("vmhost2", "vmhost1"):
        pair.cli("replication", "remove", vm, host=host)
        pair.cli("vm", "remove", vm, host=host)
    disk.unlink()
    print(f"  cap {label}: initial {initial / 1e6:.1f} Mbit/s, delta {delta / 1e6:.1f} Mbit/s",
          flush=True)  # fmt: skip
    return initial, delta, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each capped transfer")
    args = ap.parse_args()
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(f"bandwidth caps, {args.seconds:g} s transfers; {os.cpu_count()} CPUs", flush=True)
    rng = random.Random(7)
    rows = []
    with replication_pair() as pair, CountingProxy(pair.port) as proxy:
        for label, cap in CAPS:
            initial, delta, total = one_cap(pair, proxy, label, cap, args.seconds, rng)
            share = [r / cap if cap else float("nan") for r in (initial, delta)]
            rows.append([label, total // MiB, initial / 1e6, share[0], delta / 1e6, share[1]])
    table(["cap", "MiB", "initial Mbit/s", "initial/cap", "delta Mbit/s", "delta/cap"], rows)
    print("target: measured/cap within 0.90-1.10; 'none' is what the link allows uncapped")
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
