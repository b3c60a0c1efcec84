"""The long network runs of the reliability issue, over the emulated WAN of tests/wan.py, with
figures written to a JSON file that scripts/reliability_report.py turns into RELIABILITY.md.

Run from the project root: ``.venv/bin/python scripts/wan_soak.py [--minutes 5] [--out F]``
(``--minutes 1`` for a short try). Three phases, each on its own VM of the same primary (side
A) replicating at a 30 s frequency, uncompressed so that every written byte crosses the link, to
the replica server (side B):

1. **load**: 200 ms round trips, 2% loss each way, 20 Mbit/s. First the link's own goodput is
   measured (one TCP stream of 8 MiB across it, the baseline in the same run). Then a writer
   puts a steady load on the running VM's disk (qemu-io through the VM's own QEMU, so the
   VM's change tracking records it as it would a guest's writes) at half that goodput for the
   run's minutes, then at one and a half times it. The arithmetic: below the goodput every
   cycle finishes within its 30 s and the pending log empties; above it the pending bytes grow
   by about (write rate − goodput) per second.
2. **outage**: the link goes down for the run's minutes while the writer goes on at 64 KiB/s,
   then comes back. Expected: deltas queue, health goes Critical, then every delta arrives in
   order and health returns to Normal with no operator.
3. **flapping**: up 10 s, down 10 s, for the run's minutes, writer as in 2; then up.

After each phase the writer stops, the script waits for the pending log to empty, and the
replica's chain must verify and equal the primary's disk (``qemu-img compare``). Samples of
pending bytes, health and the age of the replica's newest data are taken every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    make_pair,
    same_content,
)
from tests.localcluster import Cluster, Site
from tests.wan import Wan
from vmreplica._internal.drivers.qemu.chain import ReplicaChain

MiB = 1 << 20
DISK = "1G"
SAMPLE = 5.0
HEALTH_WAIT = 900.0  # --health-wait


def goodput(wan: Wan, size: int = 32 * MiB) -> float:
    """Bits per second of one TCP stream from A to B, as the link stands now."""
    server = (
        "import socket,sys;s=socket.socket();s.setsockopt(1,2,1);s.bind(('0.0.0.0',5001));"
        "s.listen();c,_=s.accept();n=0\nwhile (d:=c.recv(1<<16)): n+=len(d)\nprint(n)"
    )
    client = (
        f"import socket,time;s=socket.create_connection(('{wan.address('b')}',5001));"
        f"t=time.monotonic();s.sendall(b'x'*{size});s.shutdown(1);s.recv(1);"
        "print(time.monotonic()-t)"
    )
    receiver = subprocess.Popen(
        [*wan.prefix("b"), sys.executable, "-c", server], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    done = subprocess.run(
        [*wan.prefix("a"), sys.executable, "-c", client], capture_output=True, text=True, check=True
    )
    receiver.wait(60)
    return size * 8 / float(done.stdout.strip())


class Writer:
    """Writes ``rate`` bytes per second into a running VM's disk, in steps, until stopped."""

    def __init__(self, pair: Pair, vm: str, rate: float, disk_size: int) -> None:
        self.pair, self.vm, self.rate, self.size = pair, vm, rate, disk_size
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        offset, pattern = 0, 1
        last = time.monotonic()
        while not self._stop.wait(0.2):
            # What the rate owes since the last write: each CLI call takes a while itself.
            now = time.monotonic()
            length = int(self.rate * (now - last)) // 4096 * 4096
            if length < 4096:
                continue
            length = min(length, 64 << 20)
            last = now
            if offset + length > self.size:
                offset, pattern = 0, pattern % 250 + 1
            self.pair.cli("vm", "monitor", self.vm,
                          f'qemu-io disk0 "write -P {pattern:#x} {offset} {length}"')  # fmt: skip
            offset += length
            self.written += length


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares growth per second: the pending log rises and falls with every cycle, so its
    trend, not its last value, says whether replication keeps up."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


class Sampler:
    def __init__(self, pair: Pair, vm: str, wan: Wan) -> None:
        self.pair, self.vm, self.wan = pair, vm, wan
        self.samples: list[dict[str, Any]] = []
        self.start = time.monotonic()

    def sample(self, note: str = "") -> dict[str, Any]:
        primary = self.pair.measure(self.vm)
        replica = self.pair.measure(self.vm, REPLICA)
        newest = replica.get("last_replication_time")
        age = None
        if newest:
            age = (datetime.now(UTC) - datetime.fromisoformat(str(newest))).total_seconds()
        row = {
            "t": round(time.monotonic() - self.start, 1),
            "pending": int(primary["pending_replication_size"]),
            "health": primary["health"],
            "replica_age_s": None if age is None else round(age, 1),
            "applied": int(replica["successful_replication_count"]),
            "sent_bytes": int(self.wan.stats()["a_to_b"]["bytes"]),
            # Timing-sensitive: the machine is shared, so every sample says how loaded it was.
            "load1": round(os.getloadavg()[0], 2),
            "note": note,
        }
        self.samples.append(row)
        print(f"  t={row['t']:>6}s pending={row['pending'] / MiB:7.1f} MiB health={row['health']}"
              f" replica age={row['replica_age_s']} s load={row['load1']} {note}", flush=True)  # fmt: skip
        return row

    def run_for(self, seconds: float, every: Callable[[float], None] | None = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if every is not None:
                every(time.monotonic())
            self.sample()
            time.sleep(SAMPLE)


def settle_and_verify(pair: Pair, sampler: Sampler, timeout: float = 900) -> dict[str, Any]:
    """Writer stopped: wait for the pending log to empty and for the replica to equal the disk."""
    began = time.monotonic()
    vm = sampler.vm
    while True:
        row = sampler.sample("draining")
        if row["pending"] == 0:
            pair.cli("vm", "monitor", vm, 'qemu-io disk0 "flush"')
            if same_content(pair.primary_disk(vm, 0), pair.tip(vm, 0)):
                break
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"{vm}: the replica did not catch up within {timeout:g} s")
        time.sleep(SAMPLE)
    asyncio.run(ReplicaChain(pair.tip(vm, 0).parent).verify())
    drained = time.monotonic()
    # Health is computed over the monitoring window (REFERENCE.md, "Health"): cycles missed
    # while the link was down keep it at Warning while they are more than 20% of the window's
    # cycles, so it can only come back once enough later cycles succeed (or the window ends).
    # Wait for that with no operator, up to HEALTH_WAIT, and say how long it took and why.
    seen: list[str] = []
    while True:
        measured = pair.measure(vm)
        health, details = str(measured["health"]), list(measured["health_details"])
        seen += [d for d in details if d not in seen and health != "Normal"]
        if health == "Normal" or time.monotonic() - drained > HEALTH_WAIT:
            break
        sampler.sample("after")
        time.sleep(SAMPLE * 2)
    window = {k: measured[k] for k in ("successful_replication_count",
              "missed_replication_count", "replication_errors", "monitoring_start_time",
              "monitoring_end_time")}  # fmt: skip
    return {"drain_s": round(drained - began, 1), "equal": True, "verified": True,
            "final_health": health, "final_health_details": details,
            "normal_after_drain_s": round(time.monotonic() - drained, 1)
            if health == "Normal" else None,
            "details_until_normal": seen, "window_at_end": window}  # fmt: skip


def new_vm(pair: Pair, name: str) -> None:
    pair.cli("vm", "new", name, "--disk", DISK)
    pair.cli("vm", "start", name)
    pair.enable(name, "--compression", "false", "--frequency", "30")
    pair.cli("replication", "start-initial", name, "--wait", timeout=900)


def phase_load(pair: Pair, wan: Wan, minutes: float) -> dict[str, Any]:
    wan.shape(rtt=0.2, loss=0.02, rate=20e6)
    link = goodput(wan)
    print(f"load: link goodput {link / 1e6:.2f} Mbit/s (200 ms, 2% loss, 20 Mbit/s)", flush=True)
    new_vm(pair, "load")
    result: dict[str, Any] = {"goodput_bps": link, "steps": []}
    for factor in (0.5, 1.5):
        rate = link / 8 * factor
        sampler = Sampler(pair, "load", wan)
        sampler.sample(f"writing {rate * 8 / 1e6:.2f} Mbit/s")
        began = time.monotonic()
        with Writer(pair, "load", rate, 1 << 30) as writer:
            sampler.run_for(minutes * 60)
        actual = writer.written / (time.monotonic() - began)
        growth = slope([(s["t"], s["pending"]) for s in sampler.samples])
        step = {
            "factor": factor, "write_bps": actual * 8, "written": writer.written,
            "pending_growth_Bps": growth, "predicted_growth_Bps": max(0.0, actual - link / 8),
            "max_replica_age_s": max((s["replica_age_s"] or 0) for s in sampler.samples),
            "health_seen": sorted({str(s["health"]) for s in sampler.samples}),
            "samples": sampler.samples,
        }  # fmt: skip
        step |= settle_and_verify(pair, sampler)
        result["steps"].append(step)
    return result


def phase_outage(pair: Pair, wan: Wan, minutes: float) -> dict[str, Any]:
    wan.shape(rtt=0.2, loss=0.0, rate=20e6)
    new_vm(pair, "outage")
    sampler = Sampler(pair, "outage", wan)
    with Writer(pair, "outage", 64 * 1024, 1 << 30) as writer:
        sampler.sample("link down")
        wan.down()
        sampler.run_for(minutes * 60)
        wan.up()
        sampler.sample("link up")
        sampler.run_for(60)
    result: dict[str, Any] = {"down_s": minutes * 60, "written": writer.written}
    result["health_seen"] = sorted({str(s["health"]) for s in sampler.samples})
    result["max_pending"] = max(s["pending"] for s in sampler.samples)
    result |= settle_and_verify(pair, sampler)
    result["samples"] = sampler.samples
    return result


def phase_flapping(pair: Pair, wan: Wan, minutes: float) -> dict[str, Any]:
    wan.shape(rtt=0.2, loss=0.0, rate=20e6)
    new_vm(pair, "flap")
    sampler = Sampler(pair, "flap", wan)
    state = {"up": True, "since": time.monotonic(), "flips": 0}

    def flip(now: float) -> None:
        if now - state["since"] >= 10:
            (wan.down if state["up"] else wan.up)()
            state["up"] = not state["up"]
            state["since"] = now
            state["flips"] += 1

    with Writer(pair, "flap", 64 * 1024, 1 << 30) as writer:
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            flip(time.monotonic())
            sampler.sample("up" if state["up"] else "down")
            time.sleep(1.0 if time.monotonic() - state["since"] < 9 else 0.2)
        wan.up()
    result: dict[str, Any] = {"flips": state["flips"], "written": writer.written}
    result["health_seen"] = sorted({str(s["health"]) for s in sampler.samples})
    result |= settle_and_verify(pair, sampler)
    errors = pair.measure("flap")["replication_errors"]
    result["replication_errors"] = errors
    result["samples"] = sampler.samples
    return result


def main() -> None:
    global HEALTH_WAIT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--minutes", type=float, default=5.0, help="of each load step, outage, flapping"
    )
    ap.add_argument("--phases", default="load,outage,flapping")
    ap.add_argument("--out", type=Path, default=Path("bench/results/wan_soak.json"))
    ap.add_argument("--health-wait", type=float, default=HEALTH_WAIT,
                    help="seconds to wait, after a phase drained, for health to be Normal")  # fmt: skip
    args = ap.parse_args()
    HEALTH_WAIT = args.health_wait
    # SIGTERM (timeout, Ctrl-C from a supervisor) ends the run through the finally below, which
    # stops the agents and the link and deletes the namespaces.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = datetime.now(UTC)
    # A run of some phases keeps the others' results from an earlier run.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results |= {"started": began.isoformat(), "minutes": args.minutes}
    results["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    wan = Wan.start()
    cluster = None
    try:
        cluster = Cluster.create(
            names=(REPLICA, PRIMARY),
            base=Path(f"/tmp/rsoak-{began:%H%M%S}"),
            sites={
                PRIMARY: Site(tuple(wan.prefix("a")), wan.address("a")),
                REPLICA: Site(tuple(wan.prefix("b")), wan.address("b")),
            },
        )
        cluster.start_all()
        pair = make_pair(cluster)
        phases = {"load": phase_load, "outage": phase_outage, "flapping": phase_flapping}
        for name in args.phases.split(","):
            print(f"== {name}", flush=True)
            phase_began = datetime.now(UTC).isoformat()
            results[name] = phases[name](pair, wan, args.minutes)
            # Phases of other runs stay in the file: each says which run it came from.
            results[name]["run"] = {"started": phase_began, "finished": datetime.now(UTC)
                                    .isoformat(), "commit": results["commit"]}  # fmt: skip
    finally:
        results["finished"] = datetime.now(UTC).isoformat()
        results["link"] = wan.stats()
        if cluster is not None:
            cluster.close()
        wan.stop()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
