"""QEMU processes that run VMs, outliving the agent that started them.

A VM must keep running when the host agent restarts or is killed, so QEMU runs in its own
session, its stdout and stderr go to files in the VM's run directory, and the agent finds it
again through the pidfile (:func:`attach`). QEMU's ``-daemonize`` would detach it too, but it
sends stdout to /dev/null, and in QEMU 7.2 HMP ``qemu-io`` prints its results (including
"Pattern verification failed") on stdout, not in the monitor reply; :meth:`QemuVm.hmp` reads
them back from ``qemu.out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path

from vmreplica._internal.drivers.qemu import qga
from vmreplica._internal.drivers.qemu.command_line import (
    argv,
    pid_path,
    qga_path,
    qmp_path,
    validate,
)
from vmreplica._internal.drivers.qemu.qmp import (
    EventSubscription,
    PidProcess,
    QmpSession,
    connect_when_ready,
    last_error,
)
from vmreplica._internal.ports.hypervisor import VmSpec as VmSpec
from vmreplica.errors import (
    AccessDenied,
    ConnectionFailed,
    InvalidState,
    VmrError,
)

_HMP_INFO = re.compile(r"info(?: +[A-Za-z0-9_-]+)*")
_HMP_QEMU_IO = re.compile(r'qemu-io +(?:-d +)?[A-Za-z0-9_/-]+ +"[^"]*"')


class VmEnd(enum.Enum):
    """How a VM stopped running, as told by :meth:`QemuVm.wait_end`."""

    POWERED_OFF = "powered-off"
    """The guest shut down; QEMU is still alive (``-no-shutdown``) and should be quit()."""
    EXITED = "exited"
    """QEMU exited after a SHUTDOWN event (quit, SIGTERM): it closed its images."""
    DIED = "died"
    """QEMU vanished without a SHUTDOWN event (kill -9, crash): persistent bitmaps are in-use."""


def cmdline(pid: int) -> list[str]:
    """argv of ``pid``; empty if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def is_vm_process(pid: int, spec: VmSpec) -> bool:
    """Whether ``pid`` is alive and is QEMU running ``spec``, without being its parent.

    /proc/PID/cmdline is empty for a pid that is gone or a zombie, so it alone answers both.
    """
    return _runs(spec, cmdline(pid))


def _runs(spec: VmSpec, argv: list[str]) -> bool:
    """Whether ``argv`` is QEMU running ``spec``.

    A pid from the pidfile is no proof: after a crash or a reboot it may belong to anything.
    The uuid and the pidfile path must both match, because one VM id can run under two run
    directories on one machine (a test failover beside its primary, test clusters).
    """
    if not argv or not Path(argv[0]).name.startswith("qemu-system"):
        return False
    opts = dict(itertools.pairwise(argv))
    pidfile = opts.get("-pidfile") == str(pid_path(spec))
    return pidfile and opts.get("-uuid", "").lower() == spec.id.lower()


def _find(spec: VmSpec) -> PidProcess | None:
    def matches(pid: int) -> bool:
        return is_vm_process(pid, spec)

    with contextlib.suppress(OSError, ValueError):
        proc = PidProcess.open(int(pid_path(spec).read_text().strip()), matches)
        if proc is not None:
            return proc
    # QEMU unlinks its pidfile on exit; one removed by hand must not hide a live VM.
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and matches(int(entry.name)):
            return PidProcess.open(int(entry.name), matches)
    return None


async def launch(spec: VmSpec, timeout: float = 30.0) -> QemuVm:
    """Start the VM's QEMU and connect to it; raises if it fails or is already running.

    Callers serialize the launches of one VM (two at once would trip over each other's socket).
    """
    validate(spec)
    run = spec.run_dir.absolute()
    try:
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise VmrError(f"cannot create run directory {run}: {exc.strerror}") from exc
    existing = _find(spec)
    if existing is not None:
        existing.close()
        raise InvalidState(f"VM '{spec.name}' is already running (QEMU pid {existing.pid})")
    with contextlib.suppress(FileNotFoundError):
        qmp_path(spec).unlink()  # left by a QEMU that was killed
    log_path = run / "qemu.log"
    with open(log_path, "ab") as log, open(run / "qemu.out", "ab") as out:
        log_start = log.tell()
        # A new session: neither Ctrl-C on the agent nor the agent's death reaches the VM.
        proc = PidProcess.spawn(argv(spec), out, log, new_session=True)
    what = f"VM '{spec.name}'"
    try:
        session = await connect_when_ready(qmp_path(spec), what, proc, timeout, "query-status")
        if session is None:
            reason = last_error(log_path, log_start) or f"exit status {proc.returncode}"
            raise VmrError(f"QEMU failed to start {what}: {reason}")
        return await QemuVm._start(spec, proc, session)
    except BaseException:
        proc.kill()
        await proc.wait(5.0)
        proc.close()
        raise


async def attach(spec: VmSpec, timeout: float = 10.0) -> QemuVm | None:
    """Reconnect to the VM's QEMU after an agent restart; None if it is not running.

    Raises :class:`ConnectionFailed` when QEMU runs but its monitor does not answer (another
    client holds it): the VM is alive, so reporting it dead would be wrong.
    """
    proc = _find(spec)
    if proc is None:
        return None
    vm = None
    try:
        session = await QmpSession.connect(qmp_path(spec), f"VM '{spec.name}'", timeout)
        vm = await QemuVm._start(spec, proc, session)
        return vm
    except ConnectionFailed:
        if proc.exited():  # it died just now
            return None
        raise
    finally:
        if vm is None:
            proc.close()


class QemuVm:
    """A running VM's QEMU process and the agent's QMP session to it.

    The owner learns that the VM stopped by awaiting :meth:`wait_end` (or its boolean form
    :meth:`wait_exit_or_shutdown`) in a watcher task: it returns when the guest powers off
    (QEMU stays alive in status "shutdown", waiting for :meth:`quit`) or when QEMU exits, and
    says which. Other events (block jobs...) are available through :meth:`subscribe`.

    After :meth:`quit`, :meth:`kill` or :meth:`disconnect` the object is spent.
    """

    def __init__(self, spec: VmSpec, proc: PidProcess, session: QmpSession) -> None:
        self.spec = spec
        self._proc = proc
        self._session = session
        self._what = f"VM '{spec.name}'"
        self._off = asyncio.Event()  # any SHUTDOWN since the guest last ran
        self._powered_off = asyncio.Event()  # from the guest: QEMU stays (-no-shutdown)
        self._quitting = False  # from the host (quit, SIGTERM): QEMU closes its images and exits
        self._hmp_lock = asyncio.Lock()
        self._detached = False
        self._gone = False  # QEMU was seen to exit while we held it
        self._events = session.subscribe(("SHUTDOWN", "RESUME"))
        self._watcher = asyncio.create_task(self._watch())

    @classmethod
    async def _start(cls, spec: VmSpec, proc: PidProcess, session: QmpSession) -> QemuVm:
        """Wrap a new session; on failure the session is closed and ``proc`` left to the caller."""
        vm = cls(spec, proc, session)
        try:
            # Subscribed first, so that a power-off right now is seen one way or the other.
            if await vm.status() == "shutdown":
                vm._off.set()
                vm._powered_off.set()
        except BaseException:
            await vm._hang_up()
            raise
        return vm

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def _watch(self) -> None:
        with contextlib.suppress(ConnectionFailed):
            while event := await self._events.get():
                if event.name == "SHUTDOWN":
                    self._off.set()
                    if event.data.get("guest") is True:
                        self._powered_off.set()
                    else:
                        self._quitting = True
                elif event.name == "RESUME":
                    self._off.clear()
                    self._powered_off.clear()

    def _check_attached(self) -> None:
        if self._detached:
            raise InvalidState(f"{self._what}: the agent let go of this QEMU process")

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = 60.0
    ) -> object:
        """Run a QMP command; a refusal raises QmpCommandError with QEMU's description."""
        self._check_attached()
        return await self._session.execute(cmd, args, timeout)

    def subscribe(self, names: tuple[str, ...] | None = None) -> EventSubscription:
        self._check_attached()
        return self._session.subscribe(names)

    async def status(self) -> str:
        result = await self.execute("query-status")
        return str(result.get("status", "unknown")) if isinstance(result, dict) else "unknown"

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command; includes what it printed on QEMU's stdout."""
        out = self.spec.run_dir.absolute() / "qemu.out"
        async with self._hmp_lock:
            start = out.stat().st_size if out.exists() else 0
            reply = await self.execute("human-monitor-command", {"command-line": command_line})
            with contextlib.suppress(OSError), open(out, "rb") as f:
                f.seek(start)
                printed = f.read().decode(errors="replace")
        text = (reply if isinstance(reply, str) else "") + printed
        return text.replace("\r\n", "\n")

    async def freeze_filesystems(self, timeout: float) -> int:
        return int(await qga.command(qga_path(self.spec), "guest-fsfreeze-freeze", timeout,
                                     self.spec.name))  # fmt: skip

    async def thaw_filesystems(self, timeout: float) -> int:
        return int(await qga.command(qga_path(self.spec), "guest-fsfreeze-thaw", timeout,
                                     self.spec.name))  # fmt: skip

    async def monitor(self, command: str, test_writes: bool) -> str:
        """HMP as a whole is root on the host (``migrate "exec:…"`` runs a shell command,
        ``dump-guest-memory`` writes any file): only read-only ``info`` runs, and ``qemu-io``
        where the host allows test writes."""
        allowed = _HMP_INFO.fullmatch(command) is not None or (
            test_writes and _HMP_QEMU_IO.fullmatch(command) is not None
        )
        if not allowed:
            first = command.split()[0] if command else "(empty)"
            hint = "" if test_writes else " (qemu-io needs allow_qemu_io in host.toml, for tests)"
            raise AccessDenied(
                f"vm monitor runs only read-only `info` commands, not {first!r}{hint}"
            )
        return await self.hmp(command)

    async def powerdown(self) -> None:
        """Press the ACPI power button; the guest decides whether and when to power off."""
        await self.execute("system_powerdown")

    async def _wait(self, flag: asyncio.Event, timeout: float | None) -> None:
        """Wait for ``flag`` or QEMU's exit, and note the exit with everything QEMU said."""
        if not self._gone and not flag.is_set():
            self._check_attached()
            waits = {
                asyncio.ensure_future(flag.wait()),
                asyncio.ensure_future(self._proc.wait(None)),
            }
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        if not self._gone and not self._detached and self._proc.exited():
            self._gone = True
            with contextlib.suppress(TimeoutError):  # events sent before the socket closed
                await asyncio.wait_for(asyncio.shield(self._watcher), 5.0)

    async def wait_shutdown(self, timeout: float) -> bool:
        """True once the guest is off, False on timeout or if QEMU died without a shutdown."""
        await self._wait(self._off, timeout)
        return self._off.is_set()

    async def wait_end(self) -> VmEnd:
        """Wait until the guest powers off or QEMU exits; see :class:`VmEnd`."""
        await self._wait(self._powered_off, None)
        if self._gone:
            return VmEnd.EXITED if self._quitting else VmEnd.DIED
        return VmEnd.POWERED_OFF

    async def wait_exit_or_shutdown(self) -> bool:
        """:meth:`wait_end` as "was it clean": False only when QEMU died."""
        return await self.wait_end() is not VmEnd.DIED

    async def quit(self, timeout: float = 30.0) -> None:
        """Stop QEMU cleanly, so that qcow2 images close and persistent bitmaps are stored."""
        self._check_attached()
        if not self._proc.exited():
            with contextlib.suppress(ConnectionFailed):  # QEMU may hang up before replying
                await self.execute("quit")
            if not await self._proc.wait(timeout):
                raise VmrError(f"{self._what}: QEMU did not exit within {timeout:g}s of quit")
        await self._wait(self._off, 0)
        await self.disconnect()

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL QEMU: the guest loses unflushed writes and bitmaps become in-use."""
        self._check_attached()
        self._proc.kill()
        if not await self._proc.wait(timeout):
            raise VmrError(f"{self._what}: QEMU (pid {self.pid}) survived SIGKILL")
        await self._wait(self._off, 0)
        await self.disconnect()

    async def disconnect(self) -> None:
        """Drop the QMP session and leave QEMU running, as on agent shutdown."""
        if self._detached:
            return
        await self._hang_up()
        self._gone = self._gone or self._proc.exited()  # also reaps it if it is our child
        self._proc.close()

    async def _hang_up(self) -> None:
        self._detached = True
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        self._events.close()
        await self._session.close()
