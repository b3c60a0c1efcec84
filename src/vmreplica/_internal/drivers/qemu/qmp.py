"""What QEMU and qemu-storage-daemon processes share: a QMP session, and the process behind it.

The ``qemu.qmp`` library raises its own exception tree and keeps every event it ever saw in
its default listener. A host agent keeps sessions open for weeks, so :class:`QmpSession` turns
the default listener off, delivers events only to callers that subscribed, and translates every
library failure into a :class:`~vmreplica.errors.VmrError` that names the monitor concerned.

:class:`PidProcess` tracks the process at the other end through a pidfd, so waiting for its exit
and signalling it work whether or not the agent is its parent (a VM outlives an agent restart),
and can never reach an unrelated process that reused the pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from vmreplica._internal.drivers.qemu.children import process_state
from vmreplica.errors import ConnectionFailed, VmrError

# Long enough for a slow disk, short enough that a wedged QEMU does not wedge the agent too.
DEFAULT_TIMEOUT = 60.0


class QmpCommandError(VmrError):
    """QEMU refused a command; ``error_class`` and ``desc`` are QEMU's own words.

    Callers that must react to a specific refusal (a bitmap that already exists, a node that is
    gone) can look at ``desc`` without parsing the operator-facing message.
    """

    def __init__(self, message: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: Mapping[str, object] = field(default_factory=dict)


class _Sink(EventListener):
    """A listener that keeps no history, so a long-lived subscription does not grow forever."""

    def __init__(self, names: Iterable[str] | None) -> None:
        super().__init__(None if names is None else list(names))
        self.queue: asyncio.Queue[QmpEvent] = asyncio.Queue()

    async def put(self, event: Message) -> None:
        if self.accept(event):
            data = event.get("data")
            name = str(event.get("event"))
            self.queue.put_nowait(QmpEvent(name, data if isinstance(data, dict) else {}))


class EventSubscription:
    """Events delivered from the moment of subscription, so a check-then-wait cannot miss one.

    Use as a context manager; leaving it unregisters the listener and drops what was queued.
    """

    def __init__(self, session: QmpSession, names: Iterable[str] | None) -> None:
        self._session = session
        self._sink = _Sink(names)
        session._client.register_listener(self._sink)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(QMPError):
            self._session._client.remove_listener(self._sink)

    async def get(self, timeout: float | None = None) -> QmpEvent | None:
        """Next event, or None on timeout.

        Raises :class:`ConnectionFailed` once the session is closed and nothing is queued,
        because no further event can come and waiting on would hang.
        """
        if not self._sink.queue.empty():
            return self._sink.queue.get_nowait()
        getter = asyncio.ensure_future(self._sink.queue.get())
        closed = asyncio.ensure_future(self._session.wait_closed())
        try:
            await asyncio.wait({getter, closed}, timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            closed.cancel()
            getter.cancel()  # an item it has not taken yet stays queued
        if getter.done() and not getter.cancelled():
            return getter.result()
        if not self._sink.queue.empty():  # came in just as we stopped waiting
            return self._sink.queue.get_nowait()
        if self._session.closed:
            raise ConnectionFailed(f"{self._session.what}: monitor connection closed")
        return None


class QmpSession:
    """A connected QMP session; create it with :meth:`connect`.

    QEMU 7.2 serves one client per monitor socket: a second client connects but is never
    greeted until the first hangs up. A greeting timeout is therefore reported as "busy".
    """

    def __init__(self, client: QMPClient, what: str) -> None:
        self._client = client
        self.what = what
        self._closed = asyncio.Event()
        self._close_lock = asyncio.Lock()
        # The default listener records every event forever; nobody reads it.
        client.events.event_filter = lambda _event: False
        self._watcher = asyncio.create_task(self._watch())

    @classmethod
    async def connect(cls, path: Path, what: str, timeout: float = 10.0) -> QmpSession:
        """Connect to a unix monitor socket.

        ``what`` names the monitor in every error (``VM 'web1'``). The socket is connected
        here rather than by the library so that a refused or missing socket, which is routine
        while a process starts, does not go through the library's error logging.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, str(path)), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            raise ConnectionFailed(f"{what}: cannot connect to monitor {path}: {reason}") from exc
        return await cls.over(
            sock, what, f"monitor {path}", timeout, " (another client may be connected)"
        )

    @classmethod
    async def over(
        cls, sock: socket.socket, what: str, where: str, timeout: float, hint: str = ""
    ) -> QmpSession:
        """The session on ``sock``, connected to ``where`` (the monitor, for errors); ``hint``
        follows a time-out's message."""
        client = QMPClient(what)
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except TimeoutError as exc:
            sock.close()
            raise ConnectionFailed(
                f"{what}: {where} did not answer within {timeout:g}s{hint}"
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            sock.close()
            raise ConnectionFailed(f"{what}: {where} hung up during handshake") from exc
        return cls(client, what)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the session is over: closed by us, or the process hung up (exited)."""
        await self._closed.wait()

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> object:
        """Run one command and return its ``return`` value, passing ``args`` through untouched."""
        if self.closed:
            raise ConnectionFailed(f"{self.what}: not connected to the monitor")
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except ExecuteError as exc:
            desc = exc.error.error.desc
            message = f"{self.what}: {cmd} failed: {desc}"
            raise QmpCommandError(message, cmd, exc.error_class, desc) from exc
        except TimeoutError as exc:
            raise VmrError(f"{self.what}: {cmd} got no answer within {timeout:g}s") from exc
        except (ExecInterruptedError, EOFError, OSError) as exc:
            raise ConnectionFailed(
                f"{self.what}: monitor connection lost during {cmd} (did QEMU exit?)"
            ) from exc
        except QMPError as exc:
            # StateError (not connected) and protocol errors: the session is unusable.
            raise ConnectionFailed(f"{self.what}: {cmd} failed: {exc}") from exc

    def subscribe(self, names: Iterable[str] | None = None) -> EventSubscription:
        """Start queueing events (all of them if ``names`` is None) until the subscription ends."""
        return EventSubscription(self, names)

    async def close(self) -> None:
        """Hang up, leaving the process running; safe to call twice or after the peer left."""
        async with self._close_lock:
            if self._client.runstate != Runstate.IDLE:
                # Whatever went wrong at the transport level has already ended the session.
                with contextlib.suppress(Exception):
                    await self._client.disconnect()
            self._closed.set()
        if not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        """Notice the peer hanging up (the process exited) and finish the disconnect."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        async with self._close_lock:
            if self._client.runstate != Runstate.IDLE:
                with contextlib.suppress(Exception):
                    await self._client.disconnect()
            self._closed.set()


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Processes this agent started, reaped once they exit so that they leave no zombie behind."""


class PidProcess:
    """A process pinned by a pidfd, whether or not we are its parent."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._fd = pidfd
        self._exit: asyncio.Future[None] | None = None
        self.returncode: int | None = None
        """Exit status, known only for our own children once they exited."""

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        stdout: IO[bytes],
        stderr: IO[bytes],
        new_session: bool,
        preexec_fn: Callable[[], None] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> PidProcess:
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd="/",
                start_new_session=new_session,
                preexec_fn=preexec_fn,
                env=env,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            raise VmrError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        _CHILDREN[popen.pid] = popen
        return cls(popen.pid, os.pidfd_open(popen.pid))

    @classmethod
    def open(cls, pid: int, matches: Callable[[int], bool]) -> PidProcess | None:
        """The live process ``pid`` if ``matches(pid)`` (typically a /proc check), else None."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        proc = cls(pid, fd)
        # Checking after pinning the pid, and checking that the pinned process still lives
        # afterwards, proves that what was checked was this process.
        if not matches(pid) or proc.exited():
            proc.close()
            return None
        return proc

    def exited(self) -> bool:
        if self._fd < 0:
            return True
        poller = select.poll()  # not select(): agents with many VMs have fds above 1024
        poller.register(self._fd, select.POLLIN)
        gone = bool(poller.poll(0))
        child = _CHILDREN.pop(self.pid, None) if gone else None
        if child is not None:
            self.returncode = child.wait()
        return gone

    async def wait(self, timeout: float | None) -> bool:
        """True once the process has exited, False if it still runs after ``timeout``."""
        if self.exited():
            return True
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._fd, self._on_exit)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        return self.exited()

    def _on_exit(self) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.get_loop().remove_reader(self._fd)
            self._exit.set_result(None)

    def kill(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._exit is not None and not self._exit.done():
            self._exit.get_loop().remove_reader(self._fd)
            self._exit.cancel()
        os.close(self._fd)
        self._fd = -1


def last_error(path: Path, start: int = 0) -> str:
    """The error a QEMU tool wrote to its log since offset ``start``, on one line.

    That is the last line naming the program ("qemu-storage-daemon: ...: Failed to get "write"
    lock") and the hints after it ("Is another process using the image?").
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    starts = [i for i, line in enumerate(lines) if line.startswith("qemu-")]
    return " ".join(lines[starts[-1] :] if starts else lines[-1:])


async def connect_when_ready(
    path: Path, what: str, proc: PidProcess, timeout: float, probe: str
) -> QmpSession | None:
    """Connect to the monitor of a starting process; None if the process exits first.

    The monitor socket appears before initialisation ends, but commands are only answered
    from the main loop, so the ``probe`` command returning means the process is ready. A
    timeout names what the last attempt saw and what the process was doing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.05  # a 5 ms first pause preceded two unexplained monitor time-outs: kept at 50 ms
    last = "no attempt"
    while not proc.exited():
        left = deadline - loop.time()
        if left <= 0:
            raise VmrError(
                f"{what}: the monitor did not come up within {timeout:g}s ({last}; "
                f"{process_state(proc.pid)})"
            )
        session = None
        try:
            session = await QmpSession.connect(path, what, left)
        except ConnectionFailed as exc:
            last = exc.message.removeprefix(f"{what}: ")
        if session is not None:
            try:
                await session.execute(probe, timeout=max(left, 1.0))
                return session
            except ConnectionFailed as exc:
                last = exc.message.removeprefix(f"{what}: ")
                await session.close()
                continue
        await proc.wait(pause)
    return None
