"""bench_rpo's measuring side: a once-a-second sampler of the replication lag and the pending
bytes of one replicating VM, the statistics of a run, and its plot.

Two lags are sampled. ``lag`` is the product's: now minus the creation time of the replica's
``Latest`` recovery point (``recovery-point list`` on the replica; the time the newest delta was
applied there, whole seconds, the same instant the primary records as ``last_replication_time``
when the replica acknowledges). ``data_lag`` is how old the newest data on the replica is: now
minus the moment the primary began to cut the newest delta the replica has (the cut's
``pending/<sequence>`` directory first seen in the primary's state directory, watched every
0.1 s; a delta leaves that directory once the replica acknowledged it). The second is the RPO a
failover at that instant would get; it exceeds the first by the time a cycle takes.
"""

from __future__ import annotations

import bisect
import itertools
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchlib import MiB

from tests.guest_load import load_progress
from vmreplica.client import Client

TARGET_LAG = 45.0


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the run's start
    lag: float
    data_lag: float | None
    pending: int  # bytes, pending_replication_size
    guest_bytes: int  # written by the guest since its load started


class PendingWatcher(threading.Thread):
    """Sees each delta directory of the primary's pending log appear and leave, and the delta's
    manifest arrive in the replica's staging directory (written once the stream is received
    and verified, before the apply)."""

    def __init__(self, vm_dir: Path, staging: Path) -> None:
        super().__init__(name="pending-watcher", daemon=True)
        self.root = vm_dir / "pending"
        self.staging = staging
        self.first_seen: dict[int, float] = {}
        self.committed: dict[int, float] = {}  # its manifest.json seen: the cut is done
        self.received: dict[int, float] = {}  # its manifest.json in staging: sent and checked
        self.gone: dict[int, float] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            now = time.time()
            try:
                present = {int(n) for n in os.listdir(self.root) if n.isdigit()}
            except FileNotFoundError:
                present = set()
            with self._lock:
                for seq in present:
                    self.first_seen.setdefault(seq, now)
                    if (
                        seq not in self.committed
                        and (self.root / str(seq) / "manifest.json").exists()
                    ):
                        self.committed[seq] = now
                    if (
                        seq not in self.received
                        and (self.staging / str(seq) / "manifest.json").exists()
                    ):
                        self.received[seq] = now
                for seq in set(self.first_seen) - present - set(self.gone):
                    self.gone[seq] = now

    def phases(self) -> list[tuple[float, float, float]]:
        """(cut, send, apply-and-acknowledge) seconds of each delta seen through all, to 0.1 s."""
        with self._lock:
            done = [q for q in sorted(self.gone) if q in self.committed and q in self.received]
            return [(self.committed[q] - self.first_seen[q],
                     self.received[q] - self.committed[q], self.gone[q] - self.received[q])
                    for q in done]  # fmt: skip

    def newest_delivered_cut(self) -> float | None:
        """When the newest delta that has left the pending log began to be cut."""
        with self._lock:
            return self.first_seen[max(self.gone)] if self.gone else None


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Run:
    rate: int  # bytes per second asked of the guest
    samples: list[Sample] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # measure's counts over the run
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    busy: float = 0.0  # share of the machine's CPU time busy during the run
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process over the run
    phases: list[tuple[float, float, float]] = field(default_factory=list)  # PendingWatcher.phases
    seconds: float = 0.0

    @property
    def achieved(self) -> float:
        """Bytes per second the guest wrote over the run."""
        first, last = self.samples[0], self.samples[-1]
        span = last.t - first.t
        return (last.guest_bytes - first.guest_bytes) / span if span > 0 else 0.0

    def at_risk(self) -> list[tuple[float, int]]:
        """(t, bytes the guest wrote since the cut of the newest delta on the replica): what a
        failover at t would lose, from the guest's own counter."""
        ts = [s.t for s in self.samples]
        out = []
        for s in self.samples:
            if s.data_lag is None:
                continue
            k = bisect.bisect_left(ts, s.t - s.data_lag)
            out.append((s.t, s.guest_bytes - self.samples[min(k, len(ts) - 1)].guest_bytes))
        return out

    def lags(self, data: bool = False) -> list[float]:
        if data:
            return [s.data_lag for s in self.samples if s.data_lag is not None]
        return [s.lag for s in self.samples]

    def peaks(self, data: bool = False) -> list[float]:
        """The lag just before each delta arrived (it drops by over 5 s), after the first
        delta; and the last sample, if it is above the last such peak (a cycle still busy)."""
        steady = [(s.data_lag if data else s.lag) for s in self.samples if s.data_lag is not None]
        values = [v for v in steady if v is not None]
        out = [a for a, b in itertools.pairwise(values) if b < a - 5.0]
        if values and (not out or values[-1] > out[-1]):
            out.append(values[-1])
        return out

    def growing(self, data: bool = False) -> bool:
        """The lag's peaks went on rising: the last is over 10 s above the first."""
        peaks = self.peaks(data)
        return len(peaks) >= 2 and peaks[-1] > peaks[0] + 10.0

    def broke(self, data: bool = False) -> bool:
        """The lag (or the data lag) went over 45 s, or kept growing."""
        lags = self.lags(data) or [0.0]
        return max(lags) > TARGET_LAG or self.growing(data)

    def row(self) -> list[object]:
        lags, data = self.lags(), self.lags(data=True) or [0.0]
        pending = max(s.pending for s in self.samples)
        risk = max((b for _, b in self.at_risk()), default=0)
        steady = [s.lag for s in self.samples if s.data_lag is not None] or [0.0]
        return [
            f"{self.rate / 1e6:g}", self.achieved / 1e6, self.seconds / 60, max(lags),
            max(steady), statistics.median(lags), max(data), statistics.median(data), pending / MiB, risk / MiB,
            self.counts.get("successful", 0), self.counts.get("missed", 0),
            self.counts.get("errors", 0), "yes" if self.broke() else "no",
            "yes" if self.broke(data=True) else "no",
            f"{self.load_before[0]:.2f}/{self.load_after[0]:.2f}", self.busy * 100,
        ]  # fmt: skip


ROW_HEADERS = [
    "asked MB/s", "wrote MB/s", "min", "max lag s", "max lag after 1st delta s", "median lag s", "max data lag s",
    "median data lag s", "max pending MiB", "max at risk MiB", "cycles ok", "missed", "errors", "lag broke",
    "data lag broke",
    "load1 before/after", "machine busy %",
]  # fmt: skip


def sample_for(
    seconds: float, primary: Client, replica: Client, vm: str, watcher: PendingWatcher,
    serial: Path, run: Run,
) -> None:  # fmt: skip
    """Sample once a second for ``seconds`` into ``run``."""
    start = time.time()
    tick = start
    while (now := time.time()) < start + seconds:
        measured = primary.replication_measure(vm)[0]
        points = replica.recovery_point_list(vm)
        now = time.time()
        latest = next(p for p in points if p.id == "Latest").creation_time
        lag = now - datetime.fromisoformat(latest).timestamp()
        cut = watcher.newest_delivered_cut()
        progress = load_progress(serial.read_text(errors="replace"))
        run.samples.append(Sample(
            now - start, lag, now - cut if cut is not None else None,
            measured.pending_replication_size, progress[-1][1] if progress else 0,
        ))  # fmt: skip
        tick += 1.0
        time.sleep(max(0.0, tick - time.time()))
    run.seconds = time.time() - start


def plot(run: Run, path: Path) -> None:
    """Lag and pending bytes over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in run.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 4.6), dpi=80)
    top.plot(t, [s.lag for s in run.samples], label="lag: now - replica's Latest point", lw=1)
    data = [(s.t / 60, s.data_lag) for s in run.samples if s.data_lag is not None]
    top.plot([x for x, _ in data], [y for _, y in data], lw=1,
             label="data lag: now - cut of the newest delta on the replica")  # fmt: skip
    top.axhline(TARGET_LAG, color="red", ls="--", lw=0.8, label="target 45 s")
    top.set_ylabel("seconds")
    top.legend(fontsize=7, loc="upper left")
    top.set_title(f"guest writing {run.rate / 1e6:g} MB/s (achieved {run.achieved / 1e6:.1f}); "
                  "30 s frequency", fontsize=9)  # fmt: skip
    bottom.plot(t, [s.pending / MiB for s in run.samples], color="tab:green", lw=1,
                label="pending_replication_size (the pending log)")  # fmt: skip
    risk = run.at_risk()
    bottom.plot([x / 60 for x, _ in risk], [b / MiB for _, b in risk], color="tab:purple", lw=1,
                label="written since the cut of the newest delta on the replica")  # fmt: skip
    bottom.set_ylabel("MiB")
    bottom.legend(fontsize=7, loc="upper left")
    bottom.set_xlabel("minutes since the initial replication finished")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
