"""One delta cycle of 64 MiB of changes through each driver, in the same run.

Each VM (1 vCPU, TCG, no guest OS: nothing else writes) gets a 1 GiB qcow2 disk; tracking starts,
64 MiB are written through QEMU's own block layer (HMP ``qemu-io``, 1 MiB writes at scattered
offsets, non-zero data), then one cut is timed: settle, cut, drop, as a cycle does. Drivers:

- ``qemu``: the built-in runtime (QMP transaction + blockdev-backup, then compaction's check);
- ``libvirt push``: ``virDomainBackupBegin`` push mode, libvirt's backup job writes the delta;
- ``libvirt pull``: pull mode, the agent reads the dirty bitmap and copies the ranges over NBD.

Each libvirt run uses a private libvirtd (tests/libvirt_host.py). Run as root:
``python bench/bench_libvirt_cycle.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import MiB, table

from tests.libvirt_host import libvirt_host
from vmreplica._internal.drivers.libvirt.driver import LibvirtDriver
from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica._internal.drivers.qemu.driver import QemuDriver
from vmreplica._internal.ports.hypervisor import DiskOwner, HypervisorDriver, VmSpec

DISK = 1 << 30
CHANGED = 64 * MiB


async def one_cycle(driver: HypervisorDriver, work: Path, name: str) -> tuple[float, int]:
    disk = work / f"{name}.qcow2"
    await qemu_img.create(disk, DISK)
    spec = VmSpec(str(uuid.uuid4()), name, 1, 256, (disk,), work / f"run-{name}")
    spec.run_dir.mkdir(parents=True)
    process = await driver.launch(spec)
    try:
        owner = DiskOwner(name, spec.disks, (0,), spec.run_dir, process, vm_id=spec.id)
        async with driver.point_in_time(owner, generation=1):
            pass  # tracking starts: generation 1
        rng = random.Random(7)
        slots = rng.sample(range(DISK // MiB), CHANGED // MiB)
        for i, slot in enumerate(slots):
            pattern = 1 + i % 250
            out = await process.monitor(f'qemu-io disk0 "write -P {pattern} {slot}M 1M"', True)
            assert "wrote" in out, out
        delta = work / f"{name}-delta.qcow2"
        async with driver.session(owner) as session:
            await session.settle(1)
            start = time.perf_counter()
            await session.cut(1, [delta])
            await session.drop(1)
            elapsed = time.perf_counter() - start
        allocated = sum(
            e.length for e in await qemu_img.map(delta) if e.data and e.depth == 0 and e.present
        )
        return elapsed, allocated
    finally:
        await process.kill()


async def main(runs: int) -> None:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="vmrbench-lv", dir="/tmp"))
    try:
        results: dict[str, list[float]] = {"qemu": [], "libvirt push": [], "libvirt pull": []}
        sizes: dict[str, int] = {}
        for run in range(runs):
            t, size = await one_cycle(QemuDriver(), work, f"q{run}")
            results["qemu"].append(t)
            sizes["qemu"] = size
            with libvirt_host(work / f"lv{run}") as host:
                for mode in ("push", "pull"):
                    driver = LibvirtDriver(host.uri, cut_mode=mode)
                    t, size = await one_cycle(driver, work, f"l{mode}{run}")
                    results[f"libvirt {mode}"].append(t)
                    sizes[f"libvirt {mode}"] = size
                    driver.conn.close()
        for label, times in results.items():
            rows.append(
                [label, f"{statistics.median(times):.2f} s", f"{min(times):.2f} s",
                 f"{sizes[label] / MiB:.0f} MiB"]
            )  # fmt: skip
        table(["driver", "cut (median)", "cut (best)", "delta data"], rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
