"""qemu-storage-daemon: QMP access to the disks of a VM that is off; and how disks are opened.

A replication cycle on an off VM needs the same block layer as a running one (persistent
bitmaps, ``blockdev-backup``, NBD exports), so the daemon opens the disks exactly as the VM's
QEMU does, and the engine drives both through the same commands and node names. That shared
disk layout (:func:`blockdev_options`, :func:`check_disks`) is defined here, beside the daemon
that does nothing but serve disks.

The daemon lives for one cycle, as a child of the agent that dies with it: left running, it would
hold the image locks and keep the VM from starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from vmreplica._internal.drivers.qemu.children import die_with_parent, process_state
from vmreplica._internal.drivers.qemu.qmp import (
    EventSubscription,
    PidProcess,
    QmpSession,
    last_error,
)
from vmreplica.errors import (
    ConnectionFailed,
    InvalidArgument,
    InvalidState,
    NotFound,
    StorageError,
    VmrError,
)

QEMU_STORAGE_DAEMON = "qemu-storage-daemon"
_QCOW2_MAGIC = b"QFI\xfb"


def node_name(index: int) -> str:
    """Format node of disk ``index``, in QEMU and in qemu-storage-daemon alike."""
    return f"disk{index}"


def blockdev_options(disks: tuple[Path, ...], direct: bool = False) -> list[str]:
    """``-blockdev`` JSON for each disk: a file node ``diskN-file`` under a qcow2 node ``diskN``.

    JSON rather than key=value, because a path may contain commas. Backing files open from the
    image header, so a differencing disk needs nothing more. ``direct`` bypasses the page cache
    (O_DIRECT), for images written in bulk that nobody reads soon.
    """
    options: list[str] = []
    for i, path in enumerate(disks):
        file: dict[str, object] = {"driver": "file", "node-name": f"{node_name(i)}-file"}
        file |= {"filename": str(path.absolute()), "cache": {"direct": direct}}
        options.append(json.dumps(file))
        options.append(
            json.dumps({"driver": "qcow2", "node-name": node_name(i), "file": file["node-name"]})
        )
    return options


def check_disks(disks: tuple[Path, ...], owner: str) -> None:
    """Refuse missing or non-qcow2 disks before QEMU does it in words an operator cannot use.

    The qcow2 magic is what qemu-img itself probes, so reading it is as good as ``qemu-img
    info`` and costs no process; anything subtler (a corrupt header, a missing backing file) is
    left to QEMU, whose own message is then reported.
    """
    seen: set[Path] = set()
    for path in disks:
        if path.absolute() in seen:
            raise InvalidArgument(f"{owner}: disk {path} is given twice")
        seen.add(path.absolute())
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise NotFound(f"{owner}: disk {path} does not exist") from None
        except OSError as exc:
            raise StorageError(f"{owner}: cannot read disk {path}: {exc.strerror}") from exc
        if magic != _QCOW2_MAGIC:
            raise InvalidArgument(f"{owner}: disk {path} is not a qcow2 image")


class StorageDaemon:
    """A running qemu-storage-daemon with disk ``i`` open as node ``disk{i}``.

    It has no HMP, so no ``qemu-io``; everything goes through :meth:`execute`. End it with
    :meth:`stop` (clean: bitmaps stored) or :meth:`kill`; the object is spent afterwards.
    """

    def __init__(
        self,
        disks: tuple[Path, ...],
        run_dir: Path,
        proc: PidProcess,
        session: QmpSession,
        what: str,
        log: tuple[Path, int],
    ) -> None:
        self.disks = disks
        self.run_dir = run_dir
        self._proc = proc
        self._session = session
        self._what = what
        self._log = log
        self._ended = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _check_running(self) -> None:
        if self._ended:
            raise InvalidState(f"{self._what} has been stopped")

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = 60.0
    ) -> object:
        """Run a QMP command; a refusal raises QmpCommandError with QEMU's description."""
        self._check_running()
        return await self._session.execute(cmd, args, timeout)

    def subscribe(self, names: Iterable[str] | None = None) -> EventSubscription:
        self._check_running()
        return self._session.subscribe(names)

    async def stop(self, timeout: float = 30.0) -> None:
        """Quit and wait for the exit, so that images close and persistent bitmaps are stored.

        Raises if the daemon does not exit in time (it is left running, to be killed by the
        caller if it so decides) or if it exited with an error.
        """
        self._check_running()
        if not self._proc.exited():
            with contextlib.suppress(ConnectionFailed):  # it may hang up before replying
                await self._session.execute("quit", timeout=timeout)
            if not await self._proc.wait(timeout):
                raise VmrError(f"{self._what} did not exit within {timeout:g}s of quit")
        await self._end()
        status = self._proc.returncode
        if status:
            reason = last_error(*self._log) or f"exit status {status}"
            raise VmrError(f"{self._what} failed: {reason}")

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the daemon: images are not closed and persistent bitmaps become in-use."""
        if self._ended:
            return
        self._proc.kill()
        if not await self._proc.wait(timeout):
            raise VmrError(f"{self._what} (pid {self.pid}) survived SIGKILL")
        await self._end()

    async def _end(self) -> None:
        self._ended = True
        await self._session.close()
        self._proc.exited()  # reaps it
        self._proc.close()


async def start_storage_daemon(
    disks: tuple[Path, ...],
    run_dir: Path,
    vm_name: str | None = None,
    timeout: float = 30.0,
    direct: bool = False,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
) -> StorageDaemon:
    """Open ``disks`` in a new qemu-storage-daemon, its files (log, pid) in ``run_dir``.

    ``vm_name`` only makes error messages name the VM the disks belong to; ``direct``: see
    :func:`blockdev_options`; ``env``: the daemon's environment, the agent's by default;
    ``args``: more of its command line, which may name the descriptors ``pass_fds`` it inherits.
    """
    what = f"storage daemon of VM '{vm_name}'" if vm_name else f"storage daemon in {run_dir}"
    if not disks:
        raise InvalidArgument(f"{what}: no disks to open")
    check_disks(disks, what)
    run = run_dir.absolute()
    try:
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise VmrError(f"cannot create run directory {run}: {exc.strerror}") from exc
    argv = [QEMU_STORAGE_DAEMON]
    for options in blockdev_options(disks, direct):
        argv += ["--blockdev", options]
    argv += args
    # The monitor is one end of a socket pair, greeting as soon as the daemon is up: nothing to
    # poll for. It comes after the disks, so that it only answers once they are open. The pid
    # file puts the run directory on the command line, where children.leftovers looks.
    ours, theirs = socket.socketpair()
    argv += ["--chardev", f"socket,id=m,fd={theirs.fileno()}", "--monitor", "chardev=m"]
    argv += ["--pidfile", str(run / "qsd.pid")]
    log_path = run / "qsd.log"
    try:
        with open(log_path, "ab") as log, open(os.devnull, "wb") as out:
            log_start = log.tell()
            proc = PidProcess.spawn(
                argv, out, log, False, die_with_parent(), env, (*pass_fds, theirs.fileno())
            )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        session = await _greeted(ours, what, proc, timeout)
    except BaseException:
        proc.kill()
        await proc.wait(5.0)
        proc.close()
        raise
    if session is None:
        await proc.wait(1.0)
        reason = last_error(log_path, log_start) or f"exit status {proc.returncode}"
        proc.close()
        raise VmrError(f"{what} failed to start: {reason}")
    return StorageDaemon(disks, run, proc, session, what, (log_path, log_start))


async def _greeted(
    sock: socket.socket, what: str, proc: PidProcess, timeout: float
) -> QmpSession | None:
    """The session on a starting daemon's monitor; None if the daemon exits first."""
    sock.setblocking(False)
    session = None
    try:
        session = await QmpSession.over(sock, what, "the monitor", timeout)
        await session.execute("query-version", timeout=timeout)  # the main loop runs
    except ConnectionFailed as exc:
        if session is not None:
            await session.close()
        if await proc.wait(1.0):
            return None  # it hung up because it exited
        why = exc.message.removeprefix(f"{what}: ")
        raise VmrError(f"{what}: {why} ({process_state(proc.pid)})") from exc
    return session
