"""Failover time (RTO): from ``failover start`` to the replica VM's QEMU running, for a 1 GiB and
a 64 GiB disk with 24 recovery points, to Latest and to the oldest point.

Run: ``.venv/bin/python bench/bench_failover.py [--quick] [--repeat 3]``.

The time is that of ``failover start`` then ``vm start`` (as in Hyper-V, a failover does not
start the VM by itself), called through the SDK (``vmreplica.client.Client``) on the replica
host's socket, so no CLI start-up is in it. Each disk (a VM that is off on the primary, so that
an unplanned failover is allowed) holds 64 MiB of data, replicates with ``--recovery-history 24
--recovery-point-interval 1``, and gets 25 cycles of a 1 MiB write each, a second apart: 24
recovery points besides Latest. Then, per repeat and per target, the failover and the start run,
``vm get`` must say Running right after, and ``vm stop --force`` and ``failover stop`` revert it
before the next. Reported: each step's median, best and median of the total, and the total with
two CLI start-ups added (what an operator typing both commands waits).

Baselines in the same run: the no-op CLI call, and what the failover itself has to do at the
least, done by hand: ``qemu-img create`` of an overlay on the replica's point, then
``qemu-system-x86_64`` started on it with ``-S`` until its QMP socket answers.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    GiB,
    MiB,
    Pair,
    exit_cleanly_on_sigterm,
    qemu_img_create,
    qemu_io_write,
    replication_pair,
    run,
    table,
)

from vmreplica.client import Client

REPLICA = "vmhost1"
POINTS = 24


@dataclass
class Case:
    size: int
    target: str  # "Latest" or "oldest"
    failover: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)

    def add(self, times: tuple[float, float]) -> None:
        self.failover.append(times[0])
        self.start.append(times[1])

    @property
    def totals(self) -> list[float]:
        return [a + b for a, b in zip(self.failover, self.start, strict=True)]


def prepared_vm(pair: Pair, name: str, size: int) -> None:
    disk = pair.base / f"{name}.qcow2"
    qemu_img_create(disk, size)
    qemu_io_write(disk, [(0, 64 * MiB, 0x11)])
    pair.new_vm(name, disk)
    pair.enable(name, "--recovery-history", str(POINTS), "--recovery-point-interval", "1")
    pair.start_initial(name)
    for i in range(POINTS + 1):
        qemu_io_write(disk, [((i + 1) * 64 * MiB % size, MiB, 0x20 + i)])
        time.sleep(1.05)
        pair.sync(name)
    points = pair.json("recovery-point", "list", name, host=REPLICA)
    print(f"  {name}: {len(points)} points", flush=True)


def oldest_point(pair: Pair, name: str) -> str:
    points = pair.json("recovery-point", "list", name, host=REPLICA)
    ids = [str(p["id"]) for p in points if str(p["id"]).lower() != "latest"]
    return sorted(ids, key=int)[0]


def fail_over(pair: Pair, name: str, point: str | None) -> tuple[float, float]:
    """``failover start`` then ``vm start``, as in Hyper-V, through the SDK on the replica host's
    socket: the seconds of each, without a CLI's start-up."""
    replica = Client(socket=pair.cluster.hosts[REPLICA].socket, timeout=600)
    start = time.perf_counter()
    # force: the primary has no certificate listener here, so the split-brain guard cannot ask
    # it; the VM is off there, which is what force asserts.
    replica.failover_start(name, recovery_point=point, force=True)
    failed_over = time.perf_counter()
    replica.vm_start(name)
    running = time.perf_counter()
    state = replica.vm_get(name).state
    if state != "Running":
        raise RuntimeError(f"{name} is {state} after vm start, not Running")
    replica.vm_stop(name, force=True)
    replica.failover_stop(name)
    return failed_over - start, running - failed_over


def by_hand(base: Path, point_image: Path) -> float:
    """Overlay on the point, then QEMU started on it (paused) until QMP answers."""
    overlay = base / "byhand-overlay.qcow2"
    qmp = base / "byhand.qmp"
    overlay.unlink(missing_ok=True)
    qmp.unlink(missing_ok=True)
    start = time.perf_counter()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(point_image), "-F", "qcow2",
        str(overlay))  # fmt: skip
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
         "-m", "256", "-drive", f"file={overlay},format=qcow2,if=virtio",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
    )  # fmt: skip
    try:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(qmp))
                    s.recv(4096)  # the QMP greeting
                    break
            except OSError:
                time.sleep(0.005)
        return time.perf_counter() - start
    finally:
        qemu.kill()
        qemu.wait()
        overlay.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 1 GiB disk only, 1 repeat")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sizes = [GiB] if args.quick else [GiB, 64 * GiB]
    repeat = 1 if args.quick else args.repeat
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    cases: list[Case] = []
    noop: list[float] = []
    hand: list[float] = []
    with replication_pair() as pair:
        for size in sizes:
            name = f"rto{size // GiB}g"
            prepared_vm(pair, name, size)
            oldest = oldest_point(pair, name)
            latest, first = Case(size, "Latest"), Case(size, f"oldest ({oldest})")
            for _ in range(repeat):
                latest.add(fail_over(pair, name, None))
                first.add(fail_over(pair, name, oldest))
                start = time.perf_counter()
                pair.cli("vm", "get", name, host=REPLICA)
                noop.append(time.perf_counter() - start)
                image = pair.storage / name / "disk0" / f"rp-{oldest}.qcow2"
                hand.append(by_hand(pair.base, image))
            cases += [latest, first]
    floor = statistics.median(noop)
    rows = [
        [f"{c.size // GiB} GiB", c.target, statistics.median(c.failover),
         statistics.median(c.start), min(c.totals), statistics.median(c.totals),
         statistics.median(c.totals) + 2 * floor]
        for c in cases
    ]  # fmt: skip
    table(["disk", "point", "failover start s", "vm start s", "best total s", "median total s",
           "median + 2 CLI start-ups s"], rows)  # fmt: skip
    print(f"no-op CLI call (vm get): median {floor:.2f} s; by hand (overlay + QEMU to QMP): "
          f"median {statistics.median(hand):.2f} s")  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
