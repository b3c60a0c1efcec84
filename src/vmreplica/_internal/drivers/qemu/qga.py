"""The QEMU guest agent's protocol: qemu-ga in the guest, on the virtio-serial port
``org.qemu.guest_agent.0`` that every VM gets (qemu.py), reached through the host side of that
port, a unix socket in the VM's run directory.

The port is a byte stream that may hold a stale answer from an earlier client, so each
conversation starts with ``guest-sync-delimited``: the agent answers with 0xFF, then the id sent,
and everything before that is skipped. A guest without the agent never answers; every step has a
timeout, and the error says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from vmreplica._internal.ports.hypervisor import GuestAgentUnavailable
from vmreplica.errors import VmrError

SYNC_TIMEOUT = 3.0  # a running agent answers in milliseconds; none answers at all


async def command(socket: Path, name: str, timeout: float, vm: str) -> Any:
    """Run one guest-agent command; its ``return`` value."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket)), SYNC_TIMEOUT
        )
    except (OSError, TimeoutError) as e:
        raise GuestAgentUnavailable(
            f"VM {vm} has no guest agent channel (started by an older agent?): {e}"
        ) from e
    sent = False
    try:
        token = secrets.randbelow(1 << 31)
        sync = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        writer.write(b"\xff" + json.dumps(sync).encode() + b"\n")
        await writer.drain()
        try:
            await asyncio.wait_for(_synced(reader, token), SYNC_TIMEOUT)
        except TimeoutError:
            raise GuestAgentUnavailable(
                f"the guest agent of VM {vm} does not answer (is qemu-guest-agent installed "
                "and running in the guest?)"
            ) from None
        sent = True  # from here on, the guest may have acted on the command
        writer.write(json.dumps({"execute": name}).encode() + b"\n")
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError:
            raise VmrError(
                f"the guest agent of VM {vm} did not finish {name} in {timeout} s"
            ) from None
        answer = json.loads(line)
        if "error" in answer:
            desc = answer["error"].get("desc", answer["error"])
            raise VmrError(f"the guest agent of VM {vm} refused {name}: {desc}")
        return answer.get("return")
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        kind = VmrError if sent else GuestAgentUnavailable
        raise kind(f"talking to the guest agent of VM {vm} failed: {e}") from e
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _synced(reader: asyncio.StreamReader, token: int) -> None:
    while True:
        await reader.readuntil(b"\xff")
        line = await reader.readline()
        with contextlib.suppress(ValueError):
            if json.loads(line).get("return") == token:
                return
