"""``--wait``: a progress bar until a step of a relationship ends (start-initial, resume
--resynchronize).

Each look asks the agent for the relationship with ``wait_while`` set to the state being waited
out: the agent answers as soon as the state changes, or after a second, so the end is seen at
once (not up to a polling interval later) and the agent serves one request a second instead of
ten. An agent older than this CLI ignores the argument and answers at once; the loop then asks
again a polling interval later, as before.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vmreplica._internal.models import Replication
from vmreplica.client import Client
from vmreplica.errors import VmrError

if TYPE_CHECKING:
    from rich.progress import Progress

INITIAL, RESYNC = "InitialReplicationInProgress", "Resynchronizing"
LONG_POLL = 1.0  # seconds the agent may hold a look
POLL = 0.1  # seconds between looks, when the agent answered at once


def _look(client: Client, vm: str, state: str) -> Replication:
    """The relationship once it left ``state``, or as it is after about LONG_POLL seconds."""
    began = time.monotonic()
    rows = client.call("replication.get", {"vm": vm, "wait_while": state, "wait_sec": LONG_POLL})
    row = Replication.from_json(rows[0])
    if row.state == state:
        time.sleep(max(0.0, POLL - (time.monotonic() - began)))
    return row


def _bar(what: str) -> Progress:
    from rich.console import Console  # here, as the CLI's other commands do without it
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(what + " of {task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True))  # fmt: skip


def wait_initial(client: Client, vm: str) -> Replication:
    with _bar("initial replication") as bar:
        task = bar.add_task(vm, total=100)
        checked = time.monotonic()
        while True:
            row = _look(client, vm, INITIAL)
            bar.update(task, completed=row.initial_replication_progress or 0)
            if row.state != INITIAL:
                break
            if time.monotonic() - checked >= 1.0:
                _raise_if_failing(client, vm)
                checked = time.monotonic()
    if row.state not in ("Replicating", RESYNC):
        detail = client.replication_measure(vm)[0].health_details
        raise VmrError(
            f"initial replication of {vm} did not finish (state {row.state}): {'; '.join(detail)}"
        )
    return row


def _raise_if_failing(client: Client, vm: str) -> None:
    """A copy that failed is retried on the replication schedule; waiting for it helps nobody."""
    measured = client.replication_measure(vm)[0]
    failures = [d for d in measured.health_details if "cannot send" in d]
    if failures:
        raise VmrError(
            f"initial replication of {vm} failed, and is retried on its schedule: {failures[0]}"
        )


def wait_resync(client: Client, vm: str, what: str) -> Replication:
    with _bar(what) as bar:
        task = bar.add_task(vm, total=100)
        while True:
            row = _look(client, vm, RESYNC)
            bar.update(task, completed=row.resynchronization_progress or 0)
            if row.state != RESYNC:
                break
    if row.state != "Replicating":
        detail = client.replication_measure(vm)[0].health_details
        raise VmrError(f"{what} of {vm} did not finish (state {row.state}): {'; '.join(detail)}")
    return row
