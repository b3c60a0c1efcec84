"""The initial-copy phase of the torture loop (tests/torture.py): replication is removed on both
sides with the replica's storage and enabled again, untouched by kills, and then the kill lands in
``replication start-initial --wait``: the point-in-time export in the VM's QEMU, the qemu-img
convert into the replica's import (a qemu-storage-daemon child of the replica agent), the
replica's staging and adoption of the copy.

After the kill, :func:`finish` plays the administrator: while the primary says the copy has not
started, or stopped without finishing, it starts the copy again (``start-initial``); while a
copy runs (the restarted primary agent copies again by itself) or a resynchronization runs (the
VM's QEMU was killed: tracking lost), it waits.
"""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING

from tests.integration.replication_env import PRIMARY, REPLICA
from tests.torture_planned import act

if TYPE_CHECKING:
    from tests.torture import Kill, Torture

VM = "app"
# The settings of Torture.setup(): the same VM enabled again the same way.
ENABLE = ("--auth", "certificate", "--frequency", "30", "--recovery-history", "2",
          "--recovery-point-interval", "1", "--auto-resynchronize", "true",
          "--auto-resynchronize-start", "00:00", "--auto-resynchronize-end", "23:59")  # fmt: skip
# The primary's states in which nothing copies and nothing will unless the administrator asks.
IDLE = ("ReadyForInitialReplication", "Error")


def enable(t: Torture) -> None:
    assert t.pair is not None
    t.cli("replication", "enable", VM, "--replica-server", REPLICA, "--replica-port",
          str(t.pair.port), *ENABLE)  # fmt: skip


def begin(t: Torture, kill: Kill) -> subprocess.Popen[str]:
    for host in (PRIMARY, REPLICA):
        t.cli("replication", "remove", VM, host=host)
    t.cli("vm", "remove", VM, "--delete-storage", "--yes", host=REPLICA)
    enable(t)
    kill.actions.append("removed and enabled again")
    return t.popen("replication", "start-initial", VM, "--wait", host=PRIMARY)


def finish(t: Torture, kill: Kill, deadline: float) -> bool:
    """Until the primary replicates again (the caller then waits for both sides as usual)."""
    while time.monotonic() < deadline:
        try:
            state = t.state(PRIMARY)["state"]
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            kill.detail = str(e)[-300:]
            time.sleep(2)
            continue
        if state == "Replicating":
            return True
        if state in IDLE:
            verb = "start-initial" if state == "ReadyForInitialReplication" else "resume"
            done = t.cli("replication", verb, VM, host=PRIMARY, check=False, timeout=300)
            act(kill, f"{verb} ({done.returncode})")
            if done.returncode != 0:
                kill.detail = done.stderr.strip()[-300:]
        time.sleep(2)
    kill.detail = f"the primary did not replicate again: {kill.detail}"
    return False
