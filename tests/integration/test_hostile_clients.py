"""Slow and many clients: 200 connections held open on each TCP listener, some trickling their
TLS handshake a byte at a time, do not keep the agent from answering ``server get`` (issue:
within a second)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import aiohttp

from tests.localcluster import Cluster

HOST = "vmhost1"


def _server_get_seconds(cluster: Cluster) -> float:
    async def ask() -> float:
        connector = aiohttp.UnixConnector(path=str(cluster.hosts[HOST].socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            began = time.monotonic()
            async with session.post("http://agent/v1/server.get", json={}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            return time.monotonic() - began

    return asyncio.run(ask())


def test_slow_and_many_clients_do_not_stop_the_agent(cluster: Cluster) -> None:
    port = cluster.hosts[HOST].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=HOST)  # fmt: skip
    targets = [port, cluster.hosts[HOST].mgmt_port]
    held: list[socket.socket] = []
    stop = threading.Event()
    # The first bytes of a TLS ClientHello, never completed.
    hello = bytes.fromhex("16030100c8010000c40303") + bytes(32)

    def trickle(sock: socket.socket) -> None:
        for byte in hello:
            if stop.wait(0.2):
                return
            with contextlib.suppress(OSError):
                sock.send(bytes([byte]))

    try:
        for target in targets:
            for n in range(200):
                sock = socket.create_connection(("127.0.0.1", target), timeout=5)
                held.append(sock)
                if n % 4 == 0:
                    threading.Thread(target=trickle, args=(sock,), daemon=True).start()
        time.sleep(1.0)  # the handshakes are under way, none can finish
        seconds = [_server_get_seconds(cluster) for _ in range(5)]
        assert max(seconds) < 1.0, seconds
        # The listeners still serve real clients too.
        test = cluster.cli("replication", "test-connection", "--replica-server", HOST,
                           "--replica-port", str(port), "-o", "json", host="vmhost2",
                           check=False)  # fmt: skip
        row = test.json()[0]  # refused (no authorization entry), but after a full handshake
        assert row["reachable"] and row["tls_ok"] and not row["authorized"], row
        assert cluster.cli("server", "get", "-c", HOST).returncode == 0
    finally:
        stop.set()
        for sock in held:
            sock.close()
