"""Pure pieces of the initial copy: how qemu-img's output becomes progress and errors, the
option escaping, the credential directory layout QEMU expects, and the fault-point sleep."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmreplica._internal import certs, faults
from vmreplica._internal.config import TlsFiles, parse_port_range
from vmreplica._internal.drivers.qemu import nbd_copy, nbd_import, tls_creds
from vmreplica._internal.ports.hypervisor import NbdPsk
from vmreplica.errors import ConnectionFailed, InvalidArgument, StorageError, VmrError


def test_progress_is_read_from_carriage_return_separated_updates() -> None:
    chunk = b"    (0.00/100%)\r    (12.50/100%)\r    (99.99/100%)\r"
    assert [float(p) for p in nbd_copy._PROGRESS_RE.findall(chunk)] == [0.0, 12.5, 99.99]
    assert nbd_copy._PROGRESS_RE.findall(b"(100/100%)") == [b"100"]


@pytest.mark.parametrize(
    ("stderr", "kind", "words"),
    [
        ("qemu-img: error while writing at byte 1048576: No space left on device", StorageError,
         "disk full on the replica"),
        ("qemu-img: error while writing at byte 0: Input/output error", ConnectionFailed,
         "failed writing to the replica"),
        ("qemu-img: Could not open 'driver=nbd,...': Failed to connect to '127.0.0.1:1': "
         "Connection refused", ConnectionFailed, "to 127.0.0.1:1 failed"),
        ("qemu-img: Could not open 'driver=nbd,...': TLS handshake failed: The TLS connection was "
         "non-properly terminated.", ConnectionFailed, "TLS handshake failed"),
        ("", ConnectionFailed, "qemu-img convert failed"),
    ],
)  # fmt: skip
def test_convert_errors_become_one_line_errors_of_the_right_class(
    stderr: str, kind: type[Exception], words: str
) -> None:
    err = nbd_copy._convert_error(stderr, 0, "127.0.0.1:1")
    assert type(err) is kind
    assert words in err.message and "\n" not in err.message
    assert "qemu-img: qemu-img" not in err.message


def test_option_values_escape_commas() -> None:
    assert tls_creds.kv("/srv/a,b/disk.qcow2") == "/srv/a,,b/disk.qcow2"
    source = nbd_copy.file_source([Path("/x,y/d.qcow2")])
    assert source.image_opts == ("driver=qcow2,file.driver=file,file.filename=/x,,y/d.qcow2",)


def test_tls_creds_dir_has_the_names_qemu_expects(tmp_path: Path) -> None:
    files = TlsFiles(*(tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem")))
    for f in (files.ca, files.cert, files.key):
        f.write_text(f.name)
    creds = tls_creds.tls_creds_dir(tmp_path / "creds", files, "client")
    names = sorted(p.name for p in creds.iterdir())
    assert names == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert (creds / "client-key.pem").read_text() == "key.pem"
    assert oct(creds.stat().st_mode & 0o777) == oct(0o700)
    # Made again (a retry), it replaces the links rather than failing.
    tls_creds.tls_creds_dir(tmp_path / "creds", files, "client")


def test_server_creds_carry_a_published_dh_group_that_qemu_loads(tmp_path: Path) -> None:
    """Without dh-params.pem, QEMU generates 2048-bit DH parameters each time it loads a
    server's credentials (up to seconds, before every initial copy could start)."""
    certs.new_ca(tmp_path / "ca")
    issued = certs.issue(tmp_path / "ca", ["replica.example.com"], tmp_path / "host")
    files = TlsFiles(issued.ca, issued.cert, issued.key)
    server = tls_creds.tls_creds(tmp_path / "server", files, "server")
    client = tls_creds.tls_creds(tmp_path / "client", files, "client")
    psk = tls_creds.tls_creds(tmp_path / "psk", NbdPsk("vmr-x", b"k" * 32), "server")
    assert not (client.directory / "dh-params.pem").exists()
    for creds in (server, psk):
        text = subprocess.run(
            ["openssl", "pkeyparam", "-in", str(creds.directory / "dh-params.pem"), "-text"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "GROUP: ffdhe3072" in text
    image = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    for creds in (server, psk):  # QEMU parses the file (a bad one fails to load)
        subprocess.run(
            ["qemu-img", "info", "--object", creds.options("server"), str(image)],
            capture_output=True, check=True,
        )  # fmt: skip


def test_direct_io_probe_leaves_nothing(tmp_path: Path) -> None:
    assert isinstance(nbd_copy.supports_direct_io(tmp_path), bool)
    assert os.listdir(tmp_path) == []


def test_a_sleep_fault_holds_only_its_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_FAULTS", {"x.point": "sleep:0.3"})

    async def run() -> tuple[float, float]:
        began = time.monotonic()
        finished: list[float] = []
        other = asyncio.create_task(asyncio.sleep(0.05))
        other.add_done_callback(lambda _: finished.append(time.monotonic() - began))
        await faults.ahit("x.point")
        return time.monotonic() - began, finished[0]

    held, other_done = asyncio.run(run())
    assert held >= 0.3 and other_done < 0.25
    monkeypatch.setattr(faults, "_FAULTS", {"x.point": "error"})
    with pytest.raises(VmrError, match=r"injected fault at x\.point"):
        asyncio.run(faults.ahit("x.point"))


def test_port_ranges() -> None:
    assert parse_port_range("10900-10999") == (10900, 10999)
    assert parse_port_range("10900") == (10900, 10900)
    for bad in ("10999-10900", "0-5", "a-b", "10900-70000", ""):
        with pytest.raises(InvalidArgument, match="invalid port range"):
            parse_port_range(bad)


def test_the_import_listens_on_a_free_port_with_tcp_nodelay() -> None:
    """The import's listening socket skips a taken port of the range, and carries TCP_NODELAY
    (the connections the daemon accepts inherit it; test_initial_copy checks those)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VmrError, match=f"no free port in initial_copy_ports {port}-{port}"):
            nbd_import.listen("127.0.0.1", (port, port))
    with nbd_import.listen("127.0.0.1", (port, port)) as sock:
        assert sock.getsockname()[1] == port
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with nbd_import.listen("127.0.0.1", None) as sock:
        assert sock.getsockname()[1] > 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
