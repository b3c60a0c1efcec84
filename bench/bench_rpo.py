"""RPO under load: a running guest writes random data at a fixed rate while it replicates every
30 s; the replication lag and the pending bytes are sampled once a second, and shorter runs at
increasing rates find the rate at which the lag breaks the 45 s target.

Run: ``.venv/bin/python bench/bench_rpo.py [--quick] [--rates 5,20] [--minutes 10]
[--break-rates 25,30,35,40,50,60,80] [--break-minutes 2.5] [--no-break]`` (MB/s: 10^6 bytes).
The search runs the break rates above the highest rate that held, in order, and stops at the
first one where the data lag broke (over 45 s, or its peaks still growing; Run.broke); if
a --rates run already broke, it goes down instead (3/4, 1/2, 1/4 of it) until one holds.

Each rate gets a fresh pair of agents (benchlib.replication_pair) and one VM on the primary: the
test guest of tests/guest.py under TCG (1 vCPU, 512 MiB) in its load mode, writing the rate in
1 MiB O_DIRECT slices of a 64 MiB random pool over a --region-mib file on its ext4 disk (a 32 GiB
sparse qcow2: the region, not the disk, bounds what a delta can hold, and the product's resync
rule of a pending log over half the disk stays out of the way). Once the guest writes, the VM is
enabled at ``--frequency 30`` and its initial replication runs (``start-initial --wait``); then
rpo_sampler samples for --minutes: the lag (now minus the replica's Latest point), the data lag
(now minus the cut of the newest delta the replica has) and ``pending_replication_size``. The
guest prints its bytes written every second on its serial console; the achieved rate is read from
there. The cycle counts are the change of ``replication measure``'s counters over the run.

Baseline, in the same run: how fast this machine moves the same kind of data outside a running
guest. ``qemu-img convert -O qcow2`` + fsync of --baseline-mib of random data (a local copy), and
one ``replication sync`` of a VM that is off, carrying that much random data written with qemu-io
(the product's own cycle, no guest competing for the CPUs). A cycle started at t is on the replica
at t + d, so the data lag peaks near 30 s + d and stays under 45 s while a cycle of 30 s of
writes takes at most 15 s: the rate that holds is about half the cycle's throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import (
    PRIMARY,
    REPLICA,
    MiB,
    Pair,
    exit_cleanly_on_sigterm,
    fsync_file,
    process_cpu,
    qemu_img_create,
    qemu_io_write,
    replication_pair,
    run,
    table,
    timed,
)
from rpo_sampler import ROW_HEADERS, PendingWatcher, Run, machine_busy, plot, sample_for

from tests.guest import GuestAssets, build_guest_assets, kernel_cmdline, make_data_disk
from tests.guest_load import Load
from vmreplica.client import Client

GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()
RESULTS = Path(__file__).resolve().parent / "results"
VM = "rpo"
POOL_MIB = 64


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def client(pair: Pair, host: str) -> Client:
    return Client(socket=pair.cluster.hosts[host].socket, timeout=120)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def measure_counts(primary: Client) -> dict[str, int]:
    m = primary.replication_measure(VM)[0]
    return {"successful": m.successful_replication_count,
            "missed": m.missed_replication_count, "errors": m.replication_errors}  # fmt: skip


def run_rate(rate: int, minutes: float, assets: GuestAssets, region_mib: int) -> Run:
    """One fresh pair, one loaded guest at ``rate`` bytes/s, sampled for ``minutes``."""
    print(f"\n== {rate / 1e6:g} MB/s for {minutes:g} min; {uptime()}", flush=True)
    result = Run(rate, load_before=os.getloadavg())
    with replication_pair() as pair:
        disk = pair.base / "rpo-data.qcow2"
        make_data_disk(disk, region_mib + region_mib // 10 + 160)
        run("qemu-img", "resize", "-q", str(disk), "32G")
        load = Load(rate, region_mib, POOL_MIB)
        pair.cli("vm", "new", VM, "--disk-path", str(disk), "--memory", "512M",
                 "--kernel", str(assets.kernel), "--initrd", str(assets.initrd),
                 "--append", kernel_cmdline(mode="load", load=load))  # fmt: skip
        pair.cli("vm", "start", VM)
        state = pair.cluster.hosts[PRIMARY].state_dir
        run_dir = next((state / "run").iterdir())
        serial = run_dir / "serial.log"
        wait_for("the guest's load", lambda: serial.exists()
                 and "vmr: load: bytes=" in serial.read_text(errors="replace"), 180)  # fmt: skip
        pair.enable(VM, "--frequency", "30")
        began = time.monotonic()
        pair.start_initial(VM)
        print(f"  initial replication of the running guest: {time.monotonic() - began:.1f} s",
              flush=True)  # fmt: skip
        primary, replica = client(pair, PRIMARY), client(pair, REPLICA)
        vm_id = primary.vm_get(VM).id
        watcher = PendingWatcher(state / "replication" / vm_id, pair.storage / VM / "staging")
        watcher.start()
        pids = {"primary agent": pair.agent_pid(PRIMARY), "replica agent": pair.agent_pid(REPLICA),
                "guest QEMU": int((run_dir / "qemu.pid").read_text())}  # fmt: skip
        cpu_before = {k: process_cpu(p).total for k, p in pids.items()}
        counts, busy = measure_counts(primary), machine_busy()
        try:
            sample_for(minutes * 60, primary, replica, VM, watcher, serial, result)
        finally:
            watcher.stop.set()
        result.phases = watcher.phases()
        after, busy_after = measure_counts(primary), machine_busy()
        result.counts = {k: after[k] - counts[k] for k in after}
        result.cpu = {k: process_cpu(p).total - cpu_before[k] for k, p in pids.items()}
        result.busy = (busy_after[0] - busy[0]) / max(1, busy_after[1] - busy[1])
    result.load_after = os.getloadavg()
    print(f"  done; {uptime()}", flush=True)
    table(ROW_HEADERS, [result.row()])
    cpu = ", ".join(f"{k} {v / result.seconds * 100:.0f}%" for k, v in result.cpu.items())
    print(f"  CPU, % of one core: {cpu}", flush=True)
    if result.phases:
        cut, send, apply = (statistics.median(p[i] for p in result.phases) for i in (0, 1, 2))
        print(f"  per cycle ({len(result.phases)}), median: cut {cut:.1f} s, send {send:.1f} s, "
              f"apply and acknowledge {apply:.1f} s", flush=True)  # fmt: skip
    plot(result, RESULTS / f"rpo_{rate / 1e6:g}MBps.png")
    return result


def baseline(size_mib: int) -> tuple[float, float]:
    """(qemu-img convert + fsync, one vmreplica cycle of a VM that is off): MB/s of the data."""
    print(f"\n== baseline: {size_mib} MiB of random data; {uptime()}", flush=True)
    with replication_pair() as pair:
        pool = pair.base / "pool"
        pool.mkdir()
        chunks = []
        for i in range(POOL_MIB):
            chunks.append(pool / f"c{i}")
            chunks[-1].write_bytes(os.urandom(MiB))
        raw = pair.base / "random.raw"
        with raw.open("wb") as fh:
            for i in range(size_mib):
                fh.write(chunks[i % POOL_MIB].read_bytes())
        copy = pair.base / "copy.qcow2"

        def convert() -> None:
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(copy))
            fsync_file(copy)

        convert_s = timed(convert)
        disk = pair.base / "off.qcow2"
        qemu_img_create(disk, 32 << 30)
        pair.new_vm(VM, disk)
        pair.enable(VM, "--frequency", "900")
        pair.start_initial(VM)
        qemu_io_write(disk, [(i * MiB, MiB, chunks[i % POOL_MIB]) for i in range(size_mib)])
        cycle_s = timed(lambda: client(pair, PRIMARY).replication_sync(VM))
    size = size_mib * MiB / 1e6
    table(["path", "seconds", "MB/s"],
          [["qemu-img convert -O qcow2 + fsync", convert_s, size / convert_s],
           ["replication sync (VM off), SDK", cycle_s, size / cycle_s]])  # fmt: skip
    return size / convert_s, size / cycle_s


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1.5 min per rate and per step")
    parser.add_argument("--rates", default="5,20", help="MB/s, comma-separated")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--break-rates", default="25,30,35,40,50,60,80")
    parser.add_argument("--break-minutes", type=float, default=2.5)
    parser.add_argument("--no-break", action="store_true", help="skip the search")
    parser.add_argument("--region-mib", type=int, default=4096)
    parser.add_argument("--baseline-mib", type=int, default=1024)
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.break_minutes, args.baseline_mib = 1.5, 1.5, 256
    rates = [int(float(r) * 1e6) for r in args.rates.split(",")]
    steps = [int(float(r) * 1e6) for r in args.break_rates.split(",")]
    began = time.monotonic()
    print(f"bench_rpo: {os.cpu_count()} CPUs; {uptime()}", flush=True)
    assets = build_guest_assets(GUEST_CACHE)
    copy_rate, cycle_rate = baseline(args.baseline_mib)
    runs = [run_rate(r, args.minutes, assets, args.region_mib) for r in rates]
    search: list[Run] = []
    if not args.no_break:
        kept = [r.rate for r in runs if not r.broke(data=True)]
        broke = [r.rate for r in runs if r.broke(data=True)]
        if broke:  # already broken: look below the lowest rate that broke
            steps = sorted({int(min(broke) * f) for f in (0.75, 0.5, 0.25)}, reverse=True)
        else:
            steps = [s for s in steps if s > max(kept, default=0)]
        for step in steps:
            search.append(run_rate(step, args.break_minutes, assets, args.region_mib))
            if search[-1].broke(data=True) != bool(broke):
                break
    print(f"\n== summary ({time.monotonic() - began:.0f} s in all; {uptime()})")
    table(ROW_HEADERS, [r.row() for r in runs + search])
    all_runs = sorted(runs + search, key=lambda r: r.rate)
    for data, what in ((False, "lag"), (True, "data lag")):
        ok = [r.rate / 1e6 for r in all_runs if not r.broke(data)]
        bad = [r.rate / 1e6 for r in all_runs if r.broke(data)]
        fine = f"held up to {max(ok):g} MB/s" if ok else "held at no rate tried"
        print(f"{what}: {fine}; " + (f"broke at {min(bad):g} MB/s" if bad else "never broke"))
    print(f"baseline: convert+fsync {copy_rate:.0f} MB/s, a cycle of a VM that is off "
          f"{cycle_rate:.0f} MB/s; half the cycle's rate: {cycle_rate / 2:.0f} MB/s")  # fmt: skip


if __name__ == "__main__":
    main()
