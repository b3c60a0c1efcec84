"""A cluster of real host agents on one machine, on loopback: the demo and the integration
tests both run on it.

Each host gets its own state directory, certificate (from one test CA) and ports; agents run as
real ``vmreplica host serve`` processes and the CLI runs as a real subprocess. ``close()`` kills
the agents and every QEMU process whose command line mentions the cluster's directory, so a
failing test never leaks VMs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tests.libvirt_host import LibvirtHost
from vmreplica._internal import certs

HOST_NAMES = ("vmhost1", "vmhost2", "vmhost3")
ADMIN = "admin.test"


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_FLOOR = _ephemeral_floor()
_GIVEN: set[int] = set()
_HELD: dict[int, socket.socket] = {}  # port -> the bound, never listening socket that holds it
_OPEN: list[Cluster] = []  # created and not closed yet: whose logs a failing test shows


def _port_range() -> tuple[int, int]:
    """Ports below the ephemeral range, and under pytest-xdist a slice of them per worker: each
    worker remembers only the ports it gave itself."""
    low = max(1024, _EPHEMERAL_FLOOR - 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not (worker.startswith("gw") and worker[2:].isdigit()) or count <= 1:
        return low, _EPHEMERAL_FLOOR
    size = (_EPHEMERAL_FLOOR - low) // count
    index = int(worker[2:]) % count
    return low + index * size, low + (index + 1) * size


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range, and held for this process until
    :func:`release_port`.

    Below the range: a port the kernel handed out (bind to port 0) can be handed out again, to
    any outgoing connection, before an agent binds it, which once failed a test with "address
    already in use". Held: between this pick and the agent's bind (and between an agent's stop
    and its restart on the same port) another process picking ports the same way (another test
    session on the machine) could bind it first. The port stays bound by a socket with
    SO_REUSEADDR that never listens: every listener of the tests (aiohttp, asyncio, etcd,
    krb5kdc, the import's own socket) sets SO_REUSEADDR too, and Linux lets it bind and listen
    beside such a socket, while a plain bind, such as this function's probe in another
    process, fails. None is given twice by one process."""
    low, high = _port_range()
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _GIVEN:
            continue
        probe = socket.socket()
        try:
            probe.bind(("", port))  # the listeners bind every address; no SO_REUSEADDR here
        except OSError:
            probe.close()
            continue
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the listener binds beside it
        _GIVEN.add(port)
        _HELD[port] = probe
        return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")


def release_port(port: int) -> None:
    """Stop holding a port :func:`free_port` gave (once what listened on it is gone); this
    process never gives it again."""
    held = _HELD.pop(port, None)
    if held is not None:
        held.close()


@dataclass(frozen=True)
class Site:
    """Where an agent runs: a command prefix (``ip netns exec NS``, tests/wan.py) and the address
    its peers reach it at."""

    prefix: tuple[str, ...] = ()
    address: str = "127.0.0.1"


@dataclass
class Host:
    name: str
    dir: Path
    config: Path
    socket: Path
    mgmt_port: int
    replica_port: int
    log: Path
    site: Site = Site()
    process: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cluster:
    base: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    cli_config: Path = Path()
    ca_dir: Path = Path()
    # Hosts whose VMs are libvirt domains: their private libvirtd (tests/libvirt_host.py).
    libvirt: dict[str, LibvirtHost] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        names: tuple[str, ...] = HOST_NAMES,
        base: Path | None = None,
        sites: Mapping[str, Site] | None = None,
        libvirt: Mapping[str, str] | None = None,
    ) -> Cluster:
        """Hosts on loopback, or each where ``sites`` puts it (a network namespace)."""
        # Under /tmp with a short name: QMP unix socket paths must stay under 108 bytes.
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="vmr", dir="/tmp"))
        else:
            base.mkdir(parents=True, exist_ok=True)
        cluster = cls(base=base)
        cluster.ca_dir = base / "ca"
        certs.new_ca(cluster.ca_dir)
        certs.issue(cluster.ca_dir, [ADMIN], base / "admin")
        sites = sites or {}
        resolve = {n: sites.get(n, Site()).address for n in names}
        cli_hosts: dict[str, Any] = {}
        for name in names:
            hdir = base / name
            certs.issue(cluster.ca_dir, [name], hdir / "tls")
            host = Host(
                name=name,
                dir=hdir,
                config=hdir / "host.toml",
                socket=hdir / "agent.sock",
                mgmt_port=free_port(),
                replica_port=free_port(),
                log=hdir / "agent.log",
                site=sites.get(name, Site()),
            )
            config = {
                "name": name,
                "state_dir": str(host.state_dir),
                "socket": str(host.socket),
                "mgmt_listen": f"127.0.0.1:{host.mgmt_port}",
                "accel": "tcg",
                "admins": [ADMIN],
                "tls": {
                    k: str(hdir / "tls" / f)
                    for k, f in (("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem"))
                },
                "resolve": resolve,
                "allow_qemu_io": True,  # tests write guest data with `vm monitor … qemu-io`
            }
            if libvirt and name in libvirt:  # this host's VMs are domains of that libvirtd
                config |= {"driver": "libvirt", "libvirt_uri": libvirt[name]}
            host.config.write_text(tomli_w.dumps(config))
            cli_hosts[name] = {
                "url": f"https://127.0.0.1:{host.mgmt_port}",
                "ca": str(cluster.ca_dir / "ca.pem"),
                "cert": str(base / "admin" / "cert.pem"),
                "key": str(base / "admin" / "key.pem"),
            }
            cluster.hosts[name] = host
        cluster.cli_config = base / "cli.toml"
        cluster.cli_config.write_text(tomli_w.dumps({"hosts": cli_hosts}))
        _OPEN.append(cluster)
        return cluster

    def env(self, host: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["VMREPLICA_CONFIG"] = str(self.cli_config)
        env["VMREPLICA_SOCKET"] = (
            str(self.hosts[host].socket) if host else str(self.base / "no-local-agent.sock")
        )
        return env

    def start(
        self, name: str, timeout: float = 30.0, extra_env: dict[str, str] | None = None
    ) -> Host:
        host = self.hosts[name]
        ready = host.dir / "ready"
        ready.unlink(missing_ok=True)
        env = self.env(name) | (extra_env or {})
        env["VMREPLICA_READY_FILE"] = str(ready)
        serve = ["host", "serve", "--config", str(host.config)]
        with open(host.log, "ab") as log:
            host.process = subprocess.Popen(
                [*host.site.prefix, sys.executable, "-m", "vmreplica", *serve],
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if host.process.poll() is not None:
                raise RuntimeError(f"agent {name} exited: {host.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent {name} not ready in {timeout}s: {host.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        return host

    def start_all(self) -> None:
        for name in self.hosts:
            self.start(name)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        host = self.hosts[name]
        if host.process is None:
            return 0
        host.process.send_signal(sig)
        code = host.process.wait(timeout)
        host.process = None
        return code

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def cli(
        self,
        *args: str,
        host: str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> Result:
        """Run the real CLI; ``host`` picks whose local unix socket it talks to."""
        proc = subprocess.run(
            [sys.executable, "-m", "vmreplica", *args],
            capture_output=True,
            text=True,
            env=self.env(host),
            input=input,
            timeout=timeout,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vmreplica {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
            )
        return result

    def cli_json(self, *args: str, host: str | None = None) -> Any:
        return self.cli(*args, "-o", "json", host=host).json()

    def qemu_pids(self) -> list[int]:
        return qemu_pids_under(self.base)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            _OPEN.remove(self)
        for host in self.hosts.values():
            if host.process is not None:
                host.process.kill()
                host.process.wait()
                host.process = None
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for host in self.hosts.values():
            release_port(host.mgmt_port)
            release_port(host.replica_port)
        if os.environ.get("VMREPLICA_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(self.base, ignore_errors=True)


def open_agent_logs(lines: int = 120) -> list[tuple[str, str]]:
    """The end of each agent log of every cluster not closed yet, as (title, text): shown
    beside a failing test's report, before its fixtures remove the logs."""
    tails = []
    for cluster in _OPEN:
        for host in cluster.hosts.values():
            with contextlib.suppress(OSError):
                text = host.log.read_text(errors="replace").splitlines()[-lines:]
                tails.append((f"agent log {host.name} ({host.log})", "\n".join(text)))
    return tails


def qemu_pids_under(path: Path) -> list[int]:
    """QEMU processes whose command line names something under `path`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmdline.split(b"\0")[0] and str(path).encode() in cmdline:
            pids.append(int(entry.name))
    return pids
