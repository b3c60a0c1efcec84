"""Fault injection points, as first-class tooling for tests (in the manner of borg's).

An agent started with ``VMREPLICA_FAULTS="primary.after_cut=kill,replica.mid_apply=error"`` dies
with SIGKILL, or raises, when it reaches the named point. At a point reached through
:func:`ahit`, ``sleep:SECONDS`` also holds that one task there (the agent goes on serving), so a
test can act inside a window that is otherwise too short to hit. ``block:SECONDS`` stops the
whole agent there, event loop included, the first time only: a stuck loop, as a watchdog sees it. Without the variable every point
is a dictionary lookup that finds nothing.

Points reached through :func:`child_hit` (``qemu-img.<command>``, right after the agent started
that child process) take two more actions:

- ``kill-child-once``: SIGKILL the child, the first time only, as an operator or the OOM killer
  might; the step that ran it fails, and what runs it again finds the point disarmed.
- ``orphan``: stop the child (SIGSTOP), then SIGKILL the agent, leaving the child behind still
  holding its images, which is what a child that does not die with the agent does.
- ``stop:SECONDS``: stop the child (SIGSTOP) for SECONDS, every time, the agent going on: a
  slow disk that holds the step open (an apply's ``apply.pending`` marker stays set meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from vmreplica.errors import VmrError


def _parse(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point:
            out[point] = action or "kill"
    return out


_FAULTS = _parse(os.environ.get("VMREPLICA_FAULTS", ""))
_FIRED: set[str] = set()


def hit(point: str) -> None:
    action = _FAULTS.get(point, "")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise VmrError(f"injected fault at {point}")
    elif action.startswith("block:") and point not in _FIRED:
        _FIRED.add(point)
        time.sleep(float(action.removeprefix("block:")))  # blocks the whole event loop, once


async def ahit(point: str) -> None:
    action = _FAULTS.get(point, "")
    if action.startswith("sleep:"):
        await asyncio.sleep(float(action.removeprefix("sleep:")))
    else:
        hit(point)


def child_hit(point: str, pid: int) -> None:
    """A child process ``pid`` was just started at ``point``; an action on it waits until it
    runs the helper itself (a child started through ``setpriv`` execs it next)."""
    action = _FAULTS.get(point)
    if action is not None:
        _wait_exec(pid)
    if action == "kill-child-once" and point not in _FIRED:
        _FIRED.add(point)
        os.kill(pid, signal.SIGKILL)
    elif action is not None and action.startswith("stop:"):
        with contextlib.suppress(ProcessLookupError):  # it ended (and was reaped) already
            os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(float(action.removeprefix("stop:")), _continue, pid)
    elif action == "orphan":
        os.kill(pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        hit(point)


def _wait_exec(pid: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "setpriv":
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)


def _continue(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # killed meanwhile (a cancelled step)
        os.kill(pid, signal.SIGCONT)
