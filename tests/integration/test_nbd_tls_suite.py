"""The TLS suite an initial copy's NBD connection runs on, read from the server's ServerHello
(TLS 1.3 sends it in the clear) by a recording proxy between real qemu-img (``nbd_copy.convert``)
and a real qemu-storage-daemon import (``nbd_import``): AES-128-GCM, with certificates and with a
pre-shared key. GnuTLS's NORMAL alone would give certificates AES-256-GCM and a SHA-256 PSK
ChaCha20-Poly1305, both dearer in CPU on the copy's two CPU-bound threads (bench/README.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from vmreplica._internal import certs
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.drivers.qemu import nbd_copy, nbd_import, tls_creds
from vmreplica._internal.drivers.qemu.qsd import start_storage_daemon
from vmreplica._internal.ports.hypervisor import NbdCredentials, NbdPsk

SUITES = {0x1301: "AES-128-GCM", 0x1302: "AES-256-GCM", 0x1303: "CHACHA20-POLY1305"}


class RecordingProxy:
    """Forwards one TCP connection to ``port``, keeping the first bytes the server sends."""

    def __init__(self, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._target = port
        self.from_server = bytearray()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(("127.0.0.1", self._target))
        back = threading.Thread(target=self._pump, args=(server, client, True), daemon=True)
        back.start()
        self._pump(client, server, False)
        back.join(30)
        client.close()
        server.close()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if record and len(self.from_server) < 1 << 16:
                    self.from_server += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(30)


def server_hello_suite(stream: bytes) -> int:
    """The cipher suite of the first TLS ServerHello in ``stream`` (NBD's own option haggling
    comes first, in the clear): record type 22, version 3.3, then handshake type 2."""
    at = stream.find(b"\x16\x03\x03")
    while at >= 0 and stream[at + 5] != 2:
        at = stream.find(b"\x16\x03\x03", at + 1)
    assert at >= 0, "no ServerHello"
    hello = at + 5 + 4 + 2 + 32  # record header, handshake header, version, random
    session_id = stream[hello]
    return int.from_bytes(stream[hello + 1 + session_id : hello + 3 + session_id], "big")


def copy_through_proxy(root: Path, kind: str) -> int:
    """Copy a small disk into an import the way an initial copy does; its suite."""
    source, target = root / "source.qcow2", root / "target.qcow2"
    for image in (source, target):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    if kind == "x509":
        certs.new_ca(root / "ca")
        certs.issue(root / "ca", ["primary.test"], root / "primary")
        certs.issue(root / "ca", ["replica.test"], root / "replica")
        server: NbdCredentials = TlsFiles(
            *(root / "replica" / f for f in ("ca.pem", "cert.pem", "key.pem"))
        )
        client: NbdCredentials = TlsFiles(
            *(root / "primary" / f for f in ("ca.pem", "cert.pem", "key.pem"))
        )
        identity = "CN=primary.test"
    else:
        server = client = NbdPsk("vmr-test", os.urandom(32))
        identity = "vmr-test"

    async def run() -> int:
        server_creds = tls_creds.tls_creds(root / "run" / "tls", server, "server")
        client_creds = tls_creds.tls_creds(root / "client-tls", client, "client")
        with nbd_import.listen("127.0.0.1", None) as sock:
            daemon = await start_storage_daemon(
                (target,), root / "run",
                args=nbd_import.server_args(server_creds, identity, sock.fileno()),
                pass_fds=(sock.fileno(),),
            )  # fmt: skip
            port = int(sock.getsockname()[1])
        proxy = RecordingProxy(port)
        try:
            exports = await nbd_import.export_nodes(daemon, ["disk0"])
            await nbd_copy.convert(
                nbd_copy.file_source([source]), 0, "127.0.0.1", proxy.port, exports[0],
                client_creds, "replica.test",
            )  # fmt: skip
        finally:
            await daemon.stop()
            proxy.close()
        return server_hello_suite(bytes(proxy.from_server))

    suite = asyncio.run(run())
    compared = subprocess.run(
        ["qemu-img", "compare", "-q", str(source), str(target)], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    return suite


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_the_copy_runs_on_aes_128_gcm(root: Path, kind: str) -> None:
    suite = copy_through_proxy(root, kind)
    assert SUITES.get(suite, hex(suite)) == "AES-128-GCM"
