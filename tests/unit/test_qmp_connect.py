"""connect_when_ready: a monitor that does not come up is reported with what was seen of it."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from vmreplica._internal.drivers.qemu.qmp import PidProcess, connect_when_ready
from vmreplica.errors import VmrError


def _timeout_message(path: Path) -> tuple[str, int]:
    """The error of a live process that never opens a monitor (a daemon stuck starting)."""

    async def run() -> tuple[str, int]:
        with open(os.devnull, "wb") as null:
            proc = PidProcess.spawn(["sleep", "60"], null, null, False)
        try:
            with pytest.raises(VmrError) as caught:
                await connect_when_ready(path, "storage daemon of VM 'app'", proc, 0.3, "x")
            return caught.value.message, proc.pid
        finally:
            proc.kill()
            await proc.wait(5.0)
            proc.close()

    return asyncio.run(run())


def test_no_socket_is_named(tmp_path: Path) -> None:
    message, pid = _timeout_message(tmp_path / "qsd.sock")
    assert message.startswith("storage daemon of VM 'app': the monitor did not come up within")
    assert "No such file or directory" in message, message
    assert f"pid {pid} sleep" in message, message


def test_a_monitor_that_never_greets_is_named(tmp_path: Path) -> None:
    path = tmp_path / "qsd.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)  # accepts nothing: connections queue, no greeting comes
        message, _ = _timeout_message(path)
    assert "did not answer" in message and "another client may be connected" in message, message
    assert "\n" not in message
