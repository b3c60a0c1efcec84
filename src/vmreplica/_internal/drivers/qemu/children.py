"""Helper processes that belong to the agent (qemu-img, qemu-storage-daemon): they die with it.

A VM's QEMU must outlive the agent; nothing else may. A ``qemu-img commit`` left running by a
dead agent holds its image lock, so the restarted agent could not finish the very apply that the
commit belonged to. Two guards: every helper is started with ``PR_SET_PDEATHSIG``, so the kernel
signals it when the agent dies, and :func:`end_leftovers`, at start-up, ends the helpers of an
earlier agent that escaped the first guard (started by an older version, or stopped at the time).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger("vmreplica.children")

_PR_SET_PDEATHSIG = 1
HELPERS = ("qemu-img", "qemu-storage-daemon", "setpriv")  # setpriv: before it runs qemu-img
SETPRIV = shutil.which("setpriv")  # util-linux


def die_with_parent_argv(argv: Sequence[str], sig: str = "KILL") -> tuple[list[str], bool]:
    """``argv`` run through ``setpriv --pdeathsig`` when there is one, which sets what
    :func:`die_with_parent` does and then execs it; and whether that was possible (else start it
    with the hook). Without a pre-exec hook Python starts the child with vfork instead of fork:
    under a millisecond of the agent's CPU instead of 9 (a fork copies the page tables of the
    agent's few hundred MB) and 11 ms instead of 35 during which the event loop waits. The agent
    dying before setpriv set the signal leaves an orphan that :func:`end_leftovers` ends."""
    if SETPRIV is None:
        return list(argv), False
    return [SETPRIV, f"--pdeathsig={sig}", "--", *argv], True


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A pre-exec hook that makes the kernel send ``sig`` to the child when the agent dies.

    SIGTERM suits the storage daemon (it then closes its images and stores their persistent
    bitmaps); every step a ``qemu-img`` runs is repeated whole after a crash, so SIGKILL suits
    it. The kernel watches the thread that forked, so start children from the event loop's
    (long-lived) thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the agent died before the hook ran
            os._exit(1)

    return hook


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def leftovers(markers: Iterable[Path]) -> list[int]:
    """Orphaned helpers (re-parented to init: their agent is gone) whose command line names one
    of ``markers``, the agent's state directory and its replica storage."""
    wanted = [str(m) for m in markers]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = _argv(int(entry.name))
        if not argv or Path(argv[0]).name not in HELPERS:
            continue
        if not any(m in arg for arg in argv for m in wanted):
            continue
        if _parent(int(entry.name)) == 1:
            found.append(int(entry.name))
    return found


def end_leftovers(markers: Iterable[Path], timeout: float = 10.0) -> list[int]:
    """End what :func:`leftovers` finds and wait until it is gone; returns the pids ended."""
    pids = leftovers(list(markers))
    for pid in pids:
        argv = _argv(pid)
        log.warning("ending %s (pid %d), left running by an earlier agent", " ".join(argv[:2]), pid)
        # A storage daemon closes its images on SIGTERM, keeping its bitmaps; a qemu-img step
        # is repeated whole by recovery, so it may simply be killed.
        daemon = Path(argv[0]).name == "qemu-storage-daemon" if argv else False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if daemon else signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)  # a stopped process acts on nothing else
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if _argv(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return pids


def process_state(pid: int) -> str:
    """``pid 123 qemu-storage-daemon, state S, waiting in do_epoll_wait``, from /proc."""
    proc = Path(f"/proc/{pid}")
    try:
        program = Path(os.readlink(proc / "exe")).name
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = (proc / "wchan").read_text().strip() or "-"
    except (OSError, IndexError):
        return f"pid {pid}"
    return f"pid {pid} {program}, state {state}, waiting in {wchan}"
