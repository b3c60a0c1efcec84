"""The planned-failover phase of the torture loop (tests/torture.py): the VM fails over to the
replica (vmhost1), replication is reversed, the guest writes there, then it fails back to vmhost2
and replication is reversed again, all through the CLI as an administrator would.

After a kill anywhere in it, :func:`home` plays the administrator: from the states both sides
show, it runs the next step of the same round trip (or waits, while an automatic
resynchronization runs) until vmhost2 is the primary again, Replicating, with its VM running.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING

from tests.integration.replication_env import PRIMARY, REPLICA

if TYPE_CHECKING:
    from tests.torture import Kill, Torture

VM = "app"
# (host, command) in order; the guest writes on vmhost1 between the reverse and the fail-back.
STEPS = (
    (PRIMARY, "vm stop app"),
    (PRIMARY, "failover start app --prepare"),
    (REPLICA, "failover start app"),
    (REPLICA, "replication set app --reverse"),
    (REPLICA, "vm start app"),
    ("", "sleep 6"),
    (REPLICA, "vm stop app"),
    (REPLICA, "failover start app --prepare"),
    (PRIMARY, "failover start app"),
    (PRIMARY, "replication set app --reverse"),
    (PRIMARY, "vm start app"),
)


def begin(t: Torture) -> subprocess.Popen[str]:
    """The whole round trip, one command after the other, in one process a kill can overlap."""
    lines = []
    for host, command in STEPS:
        if not host:
            lines.append(command)
            continue
        args = [sys.executable, "-m", "vmreplica", *command.split(), "-c", host]
        lines.append(" ".join(f"'{a}'" for a in args))
    return subprocess.Popen(["sh", "-c", " && ".join(lines)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=t.cluster.env())  # fmt: skip


def _vm_state(t: Torture, host: str) -> str:
    return str(t.json("vm", "get", VM, host=host)[0]["state"])


def _next_step(t: Torture) -> tuple[str, str] | None:
    """The step toward home from the states both sides show now; None when home, "" to wait."""
    p, r = t.state(PRIMARY), t.state(REPLICA)
    ps, rs = (p["mode"], p["state"]), (r["mode"], r["state"])
    if ps == ("Primary", "Replicating") and rs == ("Replica", "Replicating"):
        return (PRIMARY, "vm start app") if _vm_state(t, PRIMARY) == "Off" else None
    # A side that failed over reverses first: the other side still says PreparedForFailover.
    if rs == ("Replica", "FailedOverWaitingCompletion"):
        return REPLICA, "replication set app --reverse"
    if ps == ("Replica", "FailedOverWaitingCompletion"):
        return PRIMARY, "replication set app --reverse"
    if ps == ("Primary", "PreparedForFailover"):
        return REPLICA, "failover start app"
    if rs == ("Primary", "PreparedForFailover"):
        return PRIMARY, "failover start app"
    if rs == ("Primary", "Replicating"):
        if _vm_state(t, REPLICA) != "Off":
            return REPLICA, "vm stop app"
        return REPLICA, "failover start app --prepare"
    return "", ""  # a resynchronization, or a step still under way: wait


def act(kill: Kill, what: str) -> None:
    """Record an action; the same one again only counts (a step retried while it is refused)."""
    last = kill.actions[-1] if kill.actions else ""
    if last == what or last.startswith(what + " x"):
        times = int(last.rpartition(" x")[2]) if last != what else 1
        kill.actions[-1] = f"{what} x{times + 1}"
    else:
        kill.actions.append(what)


def home(t: Torture, kill: Kill, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            step = _next_step(t)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            kill.detail = str(e)[-300:]
            time.sleep(2)
            continue
        if step is None:
            return True
        host, command = step
        if not host:
            time.sleep(2)
            continue
        done = t.cli(*command.split(), host=host, check=False, timeout=180)
        act(kill, f"{host}: {command} ({done.returncode})")
        if done.returncode != 0:
            kill.detail = done.stderr.strip()[-300:]
            time.sleep(2)
    return False
