"""Agent CPU seconds per replication cycle with many small VMs replicating every 30 s, next to
the CPU cost of doing one VM's cycle with plain tools, measured in the same run.

Run: ``.venv/bin/python bench/bench_cpu.py [--quick] [--vms 20] [--seconds 150]``.

--vms VMs that are off (no kernel: running 20 TCG QEMUs idling in SeaBIOS would eat the two
cores this is meant to measure), each with a 32 MiB qcow2 disk holding 4 MiB of data, replicate
at ``--frequency 30`` to the replica agent over TLS on loopback. Once all are Replicating, the
bench reads each agent's CPU time from /proc/PID/stat (utime+stime: the agent itself;
cutime+cstime: the qemu-storage-daemon and qemu-img processes it ran and reaped), lets the
scheduler run for --seconds while a writer changes 256 KiB of every disk about once per cycle
(qemu-io on the closed image; a write that finds the image locked by a cycle's storage daemon
is retried later), reads the CPU time again and divides by the cycles that succeeded meanwhile
(``successful_replication_count`` from ``replication measure -o json``, summed over the VMs).
Also reported: cycles missed meanwhile (``missed_replication_count``: the scheduler could not
start them on time) and each agent's peak resident set (VmRSS, sampled every second; the agent
process alone, not its children). For the scale figures: ``--vms 50 --seconds 600``.

``--running``: the VMs run (TCG QEMU, 32 MiB of memory, no kernel: SeaBIOS idles) and the
writer changes 256 KiB of each disk once per cycle through the VM's monitor (HMP ``qemu-io``,
which writes through QEMU's block layer and so its dirty bitmap), as a guest would. The QEMUs'
own CPU and resident memory are reported too (found by their command line naming the bench's
directory), beside the agents'.

Baseline: what one VM's cycle costs when done with plain tools and no change tracking, ``qemu-img
convert -O raw`` of the disk then ``rsync -I --inplace --no-whole-file`` onto the previous raw
copy (CPU of those child processes, from os.times, averaged over the VMs). It reads the whole
disk every time, so it grows with disk size while a vmreplica cycle does not; at 32 MiB it is the
cheapest honest way to ship a changed disk, which makes it the floor to compare the fixed cost
of a cycle (storage daemon, QMP, block job, hashing, TLS, qemu-img on the replica) against.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import threading
import time
from pathlib import Path

from benchlib import (
    PRIMARY,
    REPLICA,
    Cpu,
    MiB,
    Pair,
    children_cpu,
    exit_cleanly_on_sigterm,
    process_cpu,
    qemu_img_create,
    qemu_io_write,
    replication_pair,
    run,
    table,
)

from vmreplica.client import Client

DISK = 32 * MiB
WRITE = 256 * 1024


def client(pair: Pair, host: str) -> Client:
    return Client(socket=pair.cluster.hosts[host].socket, timeout=120)


def successes(pair: Pair) -> dict[str, int]:
    """successful_replication_count per VM, through the CLI as an operator would read it."""
    return {str(m["vm_name"]): int(m["successful_replication_count"]) for m in pair.measure()}


def errors(pair: Pair) -> int:
    return sum(int(m["replication_errors"]) for m in pair.measure())


def missed(pair: Pair) -> int:
    """Cycles the scheduler could not start on time, summed over the VMs (Hyper-V's count)."""
    return sum(int(m["missed_replication_count"]) for m in pair.measure())


class PeakRss(threading.Thread):
    """The largest resident set of each agent process, sampled every second."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for host, pid in self.pids.items():
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            kib = int(line.split()[1])
                            self.peak[host] = max(self.peak[host], kib * 1024)


def set_up(pair: Pair, count: int, running: bool) -> list[tuple[str, Path]]:
    primary = client(pair, PRIMARY)
    vms = []
    for i in range(count):
        name, disk = f"cpu{i:02d}", pair.base / "disks" / f"cpu{i:02d}.qcow2"
        disk.parent.mkdir(exist_ok=True)
        qemu_img_create(disk, DISK)
        qemu_io_write(disk, [(i * MiB % (DISK // 2), 4 * MiB, 0x40 + i)])
        primary.vm_new(name, memory="32M" if running else None, disks=[{"path": str(disk)}])
        if running:
            primary.vm_start(name)
        primary.replication_enable(name, "vmhost1", pair.port, frequency=30)
        vms.append((name, disk))
    for name, _ in vms:
        primary.replication_start_initial(name)
    deadline = time.monotonic() + 300
    while True:
        states = {r.vm_name: r.state for r in primary.replication_get()}
        if all(s == "Replicating" for s in states.values()) and len(states) == count:
            return vms
        if time.monotonic() > deadline:
            raise RuntimeError(f"initial replication did not finish: {states}")
        time.sleep(0.5)


class Writer(threading.Thread):
    """Changes every disk once per period, skipping (for now) any that a cycle holds open."""

    def __init__(self, disks: list[Path], period: float, rng: random.Random) -> None:
        super().__init__(name="writer", daemon=True)
        self.disks, self.period, self.rng = disks, period, rng
        self.stop = threading.Event()
        self.written = self.locked = 0

    def run(self) -> None:
        data = self.disks[0].parent / "write.bin"
        data.write_bytes(os.urandom(WRITE))
        due = dict.fromkeys(self.disks, time.monotonic())
        while not self.stop.wait(0.2):
            for disk in self.disks:
                if self.stop.is_set() or time.monotonic() < due[disk]:
                    continue
                offset = self.rng.randrange(DISK // WRITE) * WRITE
                try:
                    qemu_io_write(disk, [(offset, WRITE, data)])
                    self.written += 1
                    due[disk] = time.monotonic() + self.period
                except RuntimeError:  # "Failed to get write lock": a cycle has it open
                    self.locked += 1
                    due[disk] = time.monotonic() + 1


class MonitorWriter(threading.Thread):
    """--running: changes every VM's disk once per period through its QEMU (HMP qemu-io)."""

    def __init__(self, primary: Client, names: list[str], period: float, rng: random.Random):
        super().__init__(name="writer", daemon=True)
        self.primary, self.names, self.period, self.rng = primary, names, period, rng
        self.stop = threading.Event()
        self.written = self.locked = 0

    def run(self) -> None:
        due = dict.fromkeys(self.names, time.monotonic())
        while not self.stop.wait(0.2):
            for name in self.names:
                if self.stop.is_set() or time.monotonic() < due[name]:
                    continue
                offset = self.rng.randrange(DISK // WRITE) * WRITE
                pattern = self.rng.randrange(1, 255)
                out = self.primary.vm_monitor(
                    name, f'qemu-io disk0 "write -P {pattern:#x} {offset} {WRITE}"'
                )
                if "wrote" not in out:
                    raise RuntimeError(f"{name}: qemu-io did not write: {out}")
                self.written += 1
                due[name] = time.monotonic() + self.period


def qemu_pids(base: Path) -> list[int]:
    """The VMs' QEMU processes: their command line names the bench's directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"qemu-system-x86_64") and str(base).encode() in b" ".join(
                    argv
                ):
                    pids.append(int(entry.name))
    return pids


def rss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def baseline(pair: Pair, disks: list[Path], rng: random.Random) -> float:
    """CPU seconds of ``qemu-img convert`` + ``rsync`` per VM, each after a 256 KiB change."""
    work = pair.base / "baseline"
    work.mkdir()
    data = work / "write.bin"
    data.write_bytes(os.urandom(WRITE))
    spent = 0.0
    for i, disk in enumerate(disks):
        copy, prev = work / f"{i}.qcow2", work / f"{i}.prev.raw"
        run("qemu-img", "convert", "-U", "-O", "qcow2", str(disk), str(copy))
        run("qemu-img", "convert", "-O", "raw", str(copy), str(prev))
        qemu_io_write(copy, [(rng.randrange(DISK // WRITE) * WRITE, WRITE, data)])
        now = work / f"{i}.now.raw"
        before = children_cpu()
        run("qemu-img", "convert", "-O", "raw", str(copy), str(now))
        run("rsync", "-I", "--inplace", "--no-whole-file", str(now), str(prev))
        spent += children_cpu() - before
        for path in (copy, prev, now):
            path.unlink()
    return spent / len(disks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 VMs for 40 s")
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--no-writes", action="store_true", help="empty cycles only")
    ap.add_argument("--running", action="store_true", help="the VMs run; writes go through QEMU")
    args = ap.parse_args()
    count, seconds = (4, 40.0) if args.quick else (args.vms, args.seconds)
    rng = random.Random(1)
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    state = "running (TCG, 32 MiB, no kernel)" if args.running else "off"
    print(f"{count} VMs {state}, 32 MiB disks, frequency 30 s, {seconds:g} s measured; "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    with replication_pair() as pair:
        vms = set_up(pair, count, args.running)
        print(f"  set up and initial replication in {time.monotonic() - began:.0f} s", flush=True)
        writer: Writer | MonitorWriter = (
            MonitorWriter(client(pair, PRIMARY), [n for n, _ in vms], 30.0, rng)
            if args.running
            else Writer([d for _, d in vms], 30.0, rng)
        )
        qemus = qemu_pids(pair.base) if args.running else []
        qemu_cpu_before = sum(process_cpu(pid).total for pid in qemus)
        pids = {h: pair.agent_pid(h) for h in (PRIMARY, REPLICA)}
        errors_before = errors(pair)
        missed_before = missed(pair)
        counts_before = successes(pair)
        rss = PeakRss(pids)
        rss.start()
        cpu_before = {h: process_cpu(pid) for h, pid in pids.items()}
        wall = time.monotonic()
        if not args.no_writes:
            writer.start()
        try:
            time.sleep(seconds)
        finally:
            writer.stop.set()
            with contextlib.suppress(RuntimeError):
                writer.join(30)
        cpu = {h: process_cpu(pid) - cpu_before[h] for h, pid in pids.items()}
        wall = time.monotonic() - wall
        qemu_cpu = sum(process_cpu(pid).total for pid in qemus) - qemu_cpu_before
        qemu_rss = rss_of(qemus)
        rss.stop.set()
        late = missed(pair) - missed_before
        counts_after = successes(pair)
        failed = errors(pair) - errors_before
        cycles = sum(counts_after[n] - counts_before.get(n, 0) for n in counts_after)
        base = baseline(pair, [d for _, d in vms], rng)
    if cycles == 0:
        raise SystemExit("no cycle succeeded while measuring")
    per: dict[str, Cpu] = {h: Cpu(c.own / cycles, c.children / cycles) for h, c in cpu.items()}
    rows: list[list[object]] = []
    for host, role in ((PRIMARY, "primary"), (REPLICA, "replica")):
        p = per[host]
        rows.append([role, cpu[host].total, cpu[host].total / wall * 100, p.own * 1000,
                     p.children * 1000, p.total * 1000, p.total / base,
                     rss.peak[host] / MiB])  # fmt: skip
    both = per[PRIMARY].total + per[REPLICA].total
    rows.append(["both", cpu[PRIMARY].total + cpu[REPLICA].total,
                 (cpu[PRIMARY].total + cpu[REPLICA].total) / wall * 100, "", "", both * 1000,
                 both / base, ""])  # fmt: skip
    expected = count * wall / 30
    print(f"{cycles} successful cycles in {wall:.0f} s of about {expected:.0f} scheduled "
          f"({failed} failed, {late} missed; {writer.written} writes, "
          f"{writer.locked} deferred because a cycle held the image)")  # fmt: skip
    table(
        ["agent", "CPU s", "% of 1 core", "own ms/cycle", "children ms/cycle", "total ms/cycle",
         "vs baseline", "peak RSS MiB"],
        rows,
    )  # fmt: skip
    print(f"baseline: qemu-img convert + rsync of one 32 MiB disk = {base * 1000:.0f} ms CPU")
    if qemus:
        print(f"the {len(qemus)} QEMUs: {qemu_cpu:.1f} CPU s ({qemu_cpu / wall * 100:.1f}% of 1 core), "
              f"{qemu_rss / MiB:.0f} MiB resident at the end")  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
