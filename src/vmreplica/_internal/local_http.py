"""One management API request to the local agent over its unix socket, with the standard
library's HTTP client: the CLI on the agent's own host then starts without importing aiohttp,
which is most of a short command's start-up time (HTTPS to a remote agent still uses it)."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

from vmreplica.errors import AccessDenied, ConnectionFailed


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def post(path: Path, method: str, body: bytes, timeout: float | None) -> tuple[int, bytes]:
    """POST `body` to /v1/`method`; the answer's status and body. Blocking: run in a thread."""
    target = f"the local agent ({path})"
    connection = _UnixConnection(path, timeout)
    try:
        try:
            connection.connect()
        except PermissionError as e:
            raise AccessDenied(
                f"access denied to {target}: the management socket is root-only"
            ) from e
        except OSError as e:
            raise ConnectionFailed(
                f"cannot reach the local agent at {path}: is `vmreplica host serve` running? "
                "(set VMREPLICA_SOCKET or use -c NAME)"
            ) from e
        try:
            connection.request(
                "POST", f"/v1/{method}", body=body, headers={"Content-Type": "application/json"}
            )
            answer = connection.getresponse()
            return answer.status, answer.read()
        except TimeoutError as e:
            raise ConnectionFailed(f"{target}: request failed (TimeoutError)") from e
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionFailed(f"{target}: request failed ({e or type(e).__name__})") from e
    finally:
        connection.close()
