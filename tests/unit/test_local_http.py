"""The local CLI's request over the agent's unix socket (stdlib http.client), against small
servers on a real unix socket: an answer, a missing socket, a server that hangs up, one that
never answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmreplica._internal import local_http
from vmreplica.errors import ConnectionFailed


def _serve(path: Path, handle: Callable[[socket.socket], None]) -> Iterator[None]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # shutdown wakes the thread blocked in accept(); close alone does not on Linux.
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(4096)
    return head + b"\r\n\r\n" + body


def test_an_answer_comes_back_with_its_status_and_body(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        seen.append(_read_request(conn))
        conn.sendall(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b'Content-Length: 14\r\nConnection: close\r\n\r\n{"result": 42}'
        )

    sock = tmp_path / "agent.sock"
    for _ in _serve(sock, answer):
        status, body = local_http.post(sock, "vm.list", b'{"a": 1}', timeout=5)
    assert (status, body) == (404, b'{"result": 42}')
    assert seen[0].startswith(b"POST /v1/vm.list HTTP/1.1\r\n")
    assert seen[0].endswith(b'\r\n\r\n{"a": 1}')
    assert b"content-type: application/json" in seen[0].lower()


def test_a_missing_socket_says_the_agent_is_not_running(tmp_path: Path) -> None:
    sock = tmp_path / "nothing.sock"
    with pytest.raises(ConnectionFailed, match=r"is `vmreplica host serve` running\?") as e:
        local_http.post(sock, "vm.list", b"{}", timeout=5)
    assert str(sock) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_server_that_hangs_up_is_a_failed_request(tmp_path: Path) -> None:
    def hang_up(conn: socket.socket) -> None:
        _read_request(conn)

    sock = tmp_path / "agent.sock"
    for _ in _serve(sock, hang_up):
        with pytest.raises(ConnectionFailed, match="request failed"):
            local_http.post(sock, "vm.list", b"{}", timeout=5)


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    release = threading.Event()

    def hold(conn: socket.socket) -> None:
        _read_request(conn)
        release.wait(10)

    sock = tmp_path / "agent.sock"
    for _ in _serve(sock, hold):
        with pytest.raises(ConnectionFailed, match=r"request failed \(TimeoutError\)"):
            local_http.post(sock, "vm.list", b"{}", timeout=0.3)
        release.set()
