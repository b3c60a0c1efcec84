"""Shared pieces of the end-to-end benchmarks: a replication pair of real agents on loopback,
disk images filled with qemu-io, timing, a counting TCP proxy and small table printing.

Not a benchmark itself; the ``bench_*.py`` scripts import it (it sits beside them on sys.path).
Everything a benchmark starts lives under the cluster's directory, which ``Pair.close`` (run from
``replication_pair``'s ``finally``) kills and removes, agents and QEMU processes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

# The test cluster lives in the repository's tests/ package, beside this bench/ directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.localcluster import Cluster, Result, Site, free_port

__all__ = ["Cluster", "Result", "free_port"]

PRIMARY, REPLICA = "vmhost2", "vmhost1"
MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB  # the unit of data files handed to `qemu-io write -s`


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM/SIGHUP unwind through ``finally`` blocks, so a killed bench still cleans up."""
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


def run(*cmd: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn``, started after a ``sync`` so earlier write-back does not count."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- disk images -------------------------------------------------------------------------------


def qemu_img_create(path: Path, size: int) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))


Source = int | Path  # a byte pattern for `write -P`, or a file of exactly the length, for -s


def qemu_io_write(image: Path, writes: Sequence[tuple[int, int, Source]]) -> None:
    """All ``(offset, length, source)`` writes in one qemu-io run on a closed qcow2 image.

    qemu-io opens the image through QEMU's block layer, so enabled persistent dirty bitmaps
    record these writes exactly as a running VM's would (checked: the next cycle ships them).
    """
    cmd = ["qemu-io", "-f", "qcow2"]
    for offset, length, source in writes:
        fill = f"-P {source:#x}" if isinstance(source, int) else f"-s {source}"
        cmd += ["-c", f"write -q {fill} {offset} {length}"]
    run(*cmd, str(image))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


_WORDS = (
    "the", "kernel", "started", "session", "for", "user", "root", "on", "tty1", "link", "eth0",
    "is", "up", "and", "running", "with", "carrier", "detected", "while", "systemd", "reached",
    "target", "network", "online", "after", "dhcp", "lease", "renewed", "from", "server", "in",
    "local", "domain", "backup", "job", "wrote", "its", "report", "to", "log", "file",
)  # fmt: skip


def text_bytes(n: int, rng: random.Random) -> bytes:
    """English-ish log lines: words from a small vocabulary, a time stamp and a fresh random id
    on every line (logs and documents compress well, but never into nothing)."""
    out = bytearray()
    while len(out) < n:
        stamp = (
            f"2025-01-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:{rng.randrange(60):02d}"
        )
        words = " ".join(rng.choices(_WORDS, k=rng.randrange(6, 14)))
        out += f"{stamp} host{rng.randrange(8)} {words} id={os.urandom(6).hex()}\n".encode()
    return bytes(out[:n])


def write_data_files(directory: Path, count: int, make: Callable[[int], bytes]) -> list[Path]:
    """``count`` files of CHUNK bytes each, for ``qemu-io write -s``; every one different."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = directory / f"chunk{i}"
        path.write_bytes(make(CHUNK))
        files.append(path)
    return files


def scattered_offsets(disk_size: int, count: int, unit: int, rng: random.Random) -> list[int]:
    """``count`` distinct ``unit``-aligned offsets at random over the disk, in order."""
    return sorted(unit * s for s in rng.sample(range(disk_size // unit), count))


def allocated(image: Path) -> int:
    """Bytes allocated on the host for a file (its blocks, not its apparent size)."""
    return image.stat().st_blocks * 512


def compare(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare {a} {b}: {done.stderr.decode().strip()}")
    return done.returncode == 0


# -- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of a process: its own, and that of the children it has waited for."""

    own: float
    children: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.own - other.own, self.children - other.children)

    @property
    def total(self) -> float:
        return self.own + self.children


def process_cpu(pid: int) -> Cpu:
    """utime+stime and cutime+cstime from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return Cpu((utime + stime) / tick, (cutime + cstime) / tick)


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far."""
    t = os.times()
    return t.children_user + t.children_system


# -- the replication pair ----------------------------------------------------------------------


@dataclass
class Pair:
    """vmhost2 (primary) replicates to vmhost1 (replica server, certificate listener)."""

    cluster: Cluster
    port: int
    storage: Path

    @property
    def base(self) -> Path:
        return self.cluster.base

    def cli(self, *args: str, host: str = PRIMARY, timeout: float = 600.0) -> Result:
        return self.cluster.cli(*args, host=host, timeout=timeout)

    def json(self, *args: str, host: str = PRIMARY) -> list[dict[str, Any]]:
        rows = self.cluster.cli_json(*args, host=host)
        assert isinstance(rows, list)
        return rows

    def agent_pid(self, host: str) -> int:
        process = self.cluster.hosts[host].process
        assert process is not None
        return process.pid

    def new_vm(self, name: str, disk: Path) -> None:
        self.cli("vm", "new", name, "--disk-path", str(disk))

    def enable(
        self, name: str, *extra: str, port: int | None = None, auth: str = "certificate"
    ) -> None:
        self.cli(
            "replication", "enable", name, "--replica-server", REPLICA,
            "--replica-port", str(port or self.port), "--auth", auth, *extra,
        )  # fmt: skip

    def start_initial(self, name: str) -> None:
        self.cli("replication", "start-initial", name, "--wait")

    def sync(self, name: str) -> None:
        self.cli("replication", "sync", name)

    def tip(self, name: str, disk: int = 0) -> Path:
        return self.storage / name / f"disk{disk}" / "tip.qcow2"

    def state(self, name: str) -> str:
        return str(self.json("replication", "get", name)[0]["state"])

    def measure(self, name: str | None = None) -> list[dict[str, Any]]:
        return self.json("replication", "measure", *([name] if name else []))

    def forget(self, vm: str, disk: Path) -> None:
        """Free the space (and page cache) of a finished case before the next one."""
        for host in (PRIMARY, REPLICA):
            self.cli("replication", "remove", vm, host=host)
            self.cli("vm", "remove", vm, host=host)
        disk.unlink(missing_ok=True)
        shutil.rmtree(self.storage / vm, ignore_errors=True)


@contextlib.contextmanager
def replication_pair(
    configure: Callable[[Cluster], None] | None = None, sites: Mapping[str, Site] | None = None
) -> Iterator[Pair]:
    """Two real agents on loopback (or where ``sites`` puts them), the replica server set up as
    the integration tests do; ``configure`` may change the hosts' host.toml before they start."""
    # Not /tmp/vmr…: other sessions on a shared machine clean those up with a glob.
    base = Path(tempfile.mkdtemp(prefix="rbench-", dir="/tmp"))
    try:
        cluster = Cluster.create(names=(REPLICA, PRIMARY), base=base, sites=sites)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        if configure is not None:
            configure(cluster)
        cluster.start_all()
        port = cluster.hosts[REPLICA].replica_port
        cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                    "--certificate-port", str(port), host=REPLICA)  # fmt: skip
        storage = cluster.base / "replica-storage"
        cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
                    str(storage), "--trust-group", "Bench", host=REPLICA)  # fmt: skip
        yield Pair(cluster, port, storage)
    finally:
        cluster.close()


# -- a counting TCP proxy ----------------------------------------------------------------------


class CountingProxy:
    """Forwards 127.0.0.1:<port> to a target port on its own thread, counting bytes each way.

    TLS passes through untouched (the primary checks the replica's certificate against the
    replica's name, not against the address it dialled), so the counts are what a network
    between the hosts would carry, TLS records and HTTP framing included.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.upstream = 0  # primary -> replica
        self.downstream = 0  # replica -> primary
        self._up_samples: list[tuple[float, int]] = []  # (monotonic time, upstream so far)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> None:
        with self._lock:
            self.upstream = self.downstream = 0
            self._up_samples = []

    def upstream_rate(self, settle: float = 1.0) -> float:
        """Sustained bits per second towards the replica since the last reset: from ``settle``
        seconds after the first byte (a throttle's first burst goes at once) to the last."""
        with self._lock:
            samples = list(self._up_samples)
        if not samples:
            return 0.0
        start = next((s for s in samples if s[0] >= samples[0][0] + settle), samples[0])
        span = samples[-1][0] - start[0]
        return (samples[-1][1] - start[1]) * 8 / span if span > 0 else 0.0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.upstream, self.downstream

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, upstream=True),
            self._pump(up_reader, writer, upstream=False),
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(1 << 18):
                with self._lock:
                    if upstream:
                        self.upstream += len(data)
                        self._up_samples.append((time.monotonic(), self.upstream))
                    else:
                        self.downstream += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()


# -- output ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table: the first column left, the others right."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))),
            flush=True,
        )  # fmt: skip
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"
