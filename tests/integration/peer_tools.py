"""Talking to agents the way a hostile or careless client would: raw peer requests with a host's
certificate, raw management requests on the unix socket, and a look inside an agent's state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.localcluster import Cluster
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport.peer import PeerAddress, PeerClient

# The protocol's routes, spelt out: these tests also ran against versions without its module.
HELLO = "/replication/v1/hello"
ENABLE = "/replication/v1/enable"
STATUS = "/replication/v1/status"
INITIAL_OPEN = "/replication/v1/initial-open"
INITIAL_CLOSE = "/replication/v1/initial-close"
VM_STATE = "/replication/v1/vm-state"
REVERSE = "/replication/v1/reverse"
DELTA = "/replication/v1/delta"


def tls_of(cluster: Cluster, host: str) -> TlsFiles:
    tls = cluster.hosts[host].dir / "tls"
    return TlsFiles(tls / "ca.pem", tls / "cert.pem", tls / "key.pem")


def peer_call(
    cluster: Cluster,
    sender: str,
    receiver: str,
    port: int,
    path: str,
    body: dict[str, Any] | bytes | None = None,
) -> dict[str, Any]:
    """One request of ``sender`` to ``receiver``'s certificate listener; errors raise as the
    receiver's error class (see PeerClient)."""

    async def call() -> dict[str, Any]:
        peer = PeerAddress(receiver, "127.0.0.1", port)
        async with PeerClient(peer, tls_of(cluster, sender), timeout=30) as client:
            if isinstance(body, bytes):
                return await client.call(path, data=body)
            return await client.call(path, body or {})

    return asyncio.run(call())


def mgmt_raw(cluster: Cluster, host: str, method: str, body: bytes) -> tuple[int, Any]:
    """POST raw bytes to the management API on the unix socket: (HTTP status, decoded JSON)."""

    async def call() -> tuple[int, Any]:
        connector = aiohttp.UnixConnector(path=str(cluster.hosts[host].socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"http://agent/v1/{method}", data=body) as resp,
        ):
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None

    return asyncio.run(call())


def state_db(cluster: Cluster, host: str) -> sqlite3.Connection:
    """The agent's state database, read-only (the agent may be running: WAL allows it)."""
    path = cluster.hosts[host].state_dir / "state.db"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def journal_rows(cluster: Cluster, host: str) -> list[sqlite3.Row]:
    with state_db(cluster, host) as conn:
        return list(conn.execute("SELECT * FROM journal"))


def tree(root: Path) -> set[Path]:
    """Every path below ``root`` (links not followed), for before/after comparisons."""
    return {p for p in root.rglob("*")} if root.exists() else set()


def vm_id(cluster: Cluster, host: str, vm: str) -> str:
    return str(cluster.cli_json("vm", "get", vm, host=host)[0]["id"])


def send_delta(
    cluster: Cluster, sender: str, port: int, vm: str, delta_dir: Path, sequence: int
) -> dict[str, Any]:
    """Hash whatever ``disk{i}.qcow2`` files ``delta_dir`` holds into a manifest and send them
    as delta ``sequence`` of VM ``vm`` (an id): a well-formed stream around any content."""
    (delta_dir / wire.MANIFEST).unlink(missing_ok=True)

    async def send() -> dict[str, Any]:
        manifest = await wire.build_manifest(delta_dir, vm, sequence, "CrashConsistent", "zstd")
        body = b"".join([c async for c in wire.iter_stream(delta_dir, manifest)])
        peer = PeerAddress("vmhost1", "127.0.0.1", port)
        async with PeerClient(peer, tls_of(cluster, sender), timeout=30) as client:
            return await client.call(f"{DELTA}?vm_id={vm}", data=body)

    return asyncio.run(send())


class TcpProxy:
    """Forwards a loopback port to an agent's port on threads of its own, counting the bytes
    each way (TLS and HTTP framing included: what a link between the sites would carry), and,
    with ``limit`` set, cutting each connection after that many bytes towards the agent."""

    def __init__(
        self, target_port: int, limit: int | None = None, *, port: int = 0,
        target_host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        """``port`` and ``target_host``: to stand in for a port the agent gives out (the initial
        copy's NBD port), listen on 127.0.0.1 at that port and forward to another loopback
        address, where the agent, reached there, serves it."""
        self.limit = limit
        self._target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._bytes = 0
        self._upstream: list[tuple[float, int]] = []  # (time, bytes so far) towards the agent
        self._upstream_bytes = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            threading.Thread(
                target=self._pump, args=(client, upstream, self.limit, True), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, limit: int | None, up: bool = False
    ) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
                with self._lock:
                    self._bytes += len(data)
                    if up:
                        self._upstream_bytes += len(data)
                        self._upstream.append((time.monotonic(), self._upstream_bytes))
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def take_count(self) -> int:
        """The bytes forwarded since the last call, both ways."""
        with self._lock:
            counted, self._bytes = self._bytes, 0
            return counted

    def take_upstream_rate(self, settle: float = 1.0) -> tuple[int, float]:
        """Bytes towards the agent since the last call, and their sustained rate in bits per
        second: from ``settle`` seconds after the first byte (a throttle lets its first burst
        through at once) to the last."""
        with self._lock:
            count, samples = self._upstream_bytes, self._upstream
            self._upstream_bytes, self._upstream = 0, []
        if not samples:
            return 0, 0.0
        start = next((s for s in samples if s[0] >= samples[0][0] + settle), samples[0])
        span = samples[-1][0] - start[0]
        return count, ((samples[-1][1] - start[1]) * 8 / span if span > 0 else 0.0)

    def close(self) -> None:
        self._stop = True
        self._server.close()


class ConvertSampler(threading.Thread):
    """Samples the bytes that the TCP connections of the qemu-img convert whose command line
    names ``marker`` have sent (``ss -ti``: tcp_info's bytes_sent, towards the NBD port)."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self._marker = marker.encode()
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def _port(self) -> str | None:
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-img\0convert" in cmdline and self._marker in cmdline:
                found = re.search(rb"server\.port=(\d+)", cmdline)
                return found[1].decode() if found else None
        return None

    def run(self) -> None:
        port = None
        while not self.stop.is_set():
            port = port or self._port()
            if port is not None:
                out = subprocess.run(
                    ["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                    capture_output=True, text=True,
                ).stdout  # fmt: skip
                sent = sum(int(n) for n in re.findall(r"bytes_sent:(\d+)", out))
                if sent:
                    self.samples.append((time.monotonic(), sent))
            time.sleep(0.05)

    def rate(self, settle: float = 1.0) -> tuple[int, float]:
        """Bytes sent, and the sustained rate in bits per second."""
        if not self.samples:
            return 0, 0.0
        start = self.samples[0][0] + settle
        first = next((s for s in self.samples if s[0] >= start), self.samples[0])
        top = max(s[1] for s in self.samples)
        last = min((s for s in self.samples if s[1] == top), key=lambda s: s[0])
        span = last[0] - first[0]
        return top, ((last[1] - first[1]) * 8 / span if span > 0 else 0.0)
