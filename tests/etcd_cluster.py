"""A real 3-member etcd cluster on loopback, for the cluster tests.

Each instance has its own temporary directory and its own ports (`localcluster.free_port`, the
range of this xdist worker), so two test files can run one each at the same time. Heartbeat and
election timeouts are small (50 ms, 500 ms): a member's death elects a new leader within about a
second, which keeps lease-based tests short. `close()` always kills every member it started.

Clients reach the members over TLS with `--client-cert-auth`, as production must (docs/CLUSTER.md,
"Security"): a CA and the certificates (`localhost`, server and client use) are made once per
instance with `vmreplica._internal.certs`. `tls_args` are the CLI's flags, `client()` an `Etcd`
with the client certificate. `EtcdCluster.create(tls=False)` keeps plain http for a test that needs
it. Peer traffic stays plain http: it never leaves loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.localcluster import free_port, release_port
from vmreplica._internal import certs
from vmreplica._internal.cluster.etcd import Etcd

ETCD = "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    tls: bool = True

    @property
    def client_url(self) -> str:
        # The certificates name `localhost` (certs.issue takes DNS names only).
        return f"https://localhost:{self.client_port}" if self.tls else self.listen_url

    @property
    def listen_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    base: Path
    members: list[Member] = field(default_factory=list)
    tls: bool = True

    @classmethod
    def create(cls, size: int = 3, prefix: str = "vmr-etcd-", *, tls: bool = True) -> EtcdCluster:
        base = Path(tempfile.mkdtemp(prefix=prefix))
        c = cls(base, tls=tls)
        if tls:
            certs.new_ca(base / "ca", "vmreplica test etcd CA")
            certs.issue(base / "ca", ["localhost"], base / "server")
            certs.issue(base / "ca", ["localhost"], base / "client")
        for i in range(size):
            name = f"etcd{i}"
            c.members.append(
                Member(name, free_port(), free_port(), base / name, base / f"{name}.log", tls=tls)
            )
        return c

    # The client's TLS files (the CA that signed etcd's certificate, the client certificate).

    @property
    def ca(self) -> Path:
        return self.base / "client" / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.base / "client" / "cert.pem"

    @property
    def client_key(self) -> Path:
        return self.base / "client" / "key.pem"

    @property
    def tls_args(self) -> tuple[str, ...]:
        """`cluster init|join` flags (`tests.cluster_node` takes the same)."""
        if not self.tls:
            return ()
        return ("--etcd-ca", str(self.ca), "--etcd-cert", str(self.client_cert),
                "--etcd-key", str(self.client_key))  # fmt: skip

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return certs.etcd_client_ssl_context(self.ca, self.client_cert, self.client_key)

    def client(self, timeout: float = 1) -> Etcd:
        return Etcd(self.endpoints, timeout=timeout, ssl=self.ssl_context())

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
                f"--listen-client-urls={m.listen_url}",
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
            if self.tls:
                server = self.base / "server"
                args += [
                    "--client-cert-auth",
                    f"--trusted-ca-file={server / 'ca.pem'}",
                    f"--cert-file={server / 'cert.pem'}",
                    f"--key-file={server / 'key.pem'}",
                ]
            with open(m.log, "ab") as log:
                m.process = subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
                )

    def healthy(self, member: Member) -> bool:
        """etcd's own /health: true only when the member sees a leader (a quorum)."""
        try:
            url, context = f"{member.client_url}/health", self.ssl_context()
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
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
        for m in self.members:
            release_port(m.client_port)
            release_port(m.peer_port)
        if os.environ.get("VMREPLICA_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(self.base, ignore_errors=True)
