"""A real 3-member etcd cluster on loopback, for the cluster tests.

Each instance has its own temporary directory and its own ports (`localcluster.free_port`, the
range of this xdist worker), so two test files can run one each at the same time. Heartbeat and
election timeouts are small (50 ms, 500 ms): a member's death elects a new leader within about a
second, which keeps lease-based tests short. `close()` always kills every member it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.localcluster import free_port

ETCD = "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    base: Path
    members: list[Member] = field(default_factory=list)

    @classmethod
    def create(cls, size: int = 3, prefix: str = "vmr-etcd-") -> EtcdCluster:
        base = Path(tempfile.mkdtemp(prefix=prefix))
        c = cls(base)
        for i in range(size):
            name = f"etcd{i}"
            c.members.append(
                Member(name, free_port(), free_port(), base / name, base / f"{name}.log")
            )
        return c

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def endpoints_arg(self) -> str:
        return ",".join(self.endpoints)

    def start(self, member: Member | None = None, *, initial: bool = True) -> None:
        """Start every member (or one, e.g. again after `kill`), without waiting."""
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in [member] if member else self.members:
            assert m.process is None, f"{m.name} already runs"
            m.data_dir.mkdir(parents=True, exist_ok=True)
            args = [
                ETCD,
                f"--name={m.name}",
                f"--data-dir={m.data_dir}",
                f"--listen-client-urls={m.client_url}",
                f"--advertise-client-urls={m.client_url}",
                f"--listen-peer-urls={m.peer_url}",
                f"--initial-advertise-peer-urls={m.peer_url}",
                f"--initial-cluster={initial_cluster}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token={self.base.name}",
                "--heartbeat-interval=50",
                "--election-timeout=500",
                "--logger=zap",
                "--log-outputs=stderr",
            ]
            with open(m.log, "ab") as log:
                m.process = subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
                )

    def healthy(self, member: Member) -> bool:
        """etcd's own /health: true only when the member sees a leader (a quorum)."""
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        running = [m for m in self.members if m.process is not None]
        while time.monotonic() < deadline:
            if all(self.healthy(m) for m in running):
                return
            for m in running:
                assert m.process is not None
                if m.process.poll() is not None:
                    raise AssertionError(f"{m.name} exited: {m.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise AssertionError(f"etcd not healthy after {timeout} s")

    def kill(self, member: Member) -> None:
        if member.process is not None:
            member.process.kill()
            member.process.wait()
            member.process = None

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(ProcessLookupError):
                self.kill(m)
        if os.environ.get("VMREPLICA_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(self.base, ignore_errors=True)
