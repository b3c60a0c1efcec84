"""Generations of change-tracking bitmaps: how a cycle cuts a delta without ever losing a write.

Each disk tracks writes in bitmap ``vmreplica-G`` of the current generation G (kept in the state
database). A cycle, in one QMP transaction, adds ``vmreplica-(G+1)``, freezes G, and copies G's
clusters into the delta with ``bitmap-mode=never`` so that G keeps its bits whatever happens.
Only once the delta is durably in the pending log and the database says G+1 does the agent drop
G. If anything fails in between, or the agent dies, :func:`settle` folds G+1 back into G and
re-enables it: the next cycle sees every write since the last committed delta.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmreplica._internal.hypervisor import blockjobs
from vmreplica._internal.hypervisor.blockjobs import QmpTarget
from vmreplica._internal.hypervisor.qmp import QmpCommandError
from vmreplica.errors import ResyncRequired, VmrError

__all__ = ["QmpTarget", "drop", "name", "remove_all", "rotate", "settle", "start_full"]

PREFIX = "vmreplica-"
JOB_PREFIX = "vmr"
_NAME_RE = re.compile(r"^vmreplica-(\d+)$")

Progress = Callable[[int, int], None]


def name(generation: int) -> str:
    return f"{PREFIX}{generation}"


async def _generations(target: QmpTarget, node: str) -> dict[int, dict[str, Any]]:
    found = await blockjobs.block_nodes(target, [node])
    out: dict[int, dict[str, Any]] = {}
    for bitmap in found[node].get("dirty-bitmaps") or []:
        match = _NAME_RE.match(str(bitmap.get("name")))
        if match:
            out[int(match.group(1))] = bitmap
    return out


async def start_full(target: QmpTarget, nodes: Sequence[str], dests: Sequence[Path],
                     progress: Progress | None = None) -> None:  # fmt: skip
    """Initial replication: a full copy and generation 1 of tracking, started at one instant."""
    await remove_all(target, nodes)
    await blockjobs.full_copy_with_tracking(target, nodes, dests, name(1), progress, JOB_PREFIX)


async def _clear_leftovers(target: QmpTarget) -> None:
    """Jobs and target nodes a dead agent left in a QEMU that outlived it."""
    jobs = await target.execute("query-block-jobs")
    for job in jobs if isinstance(jobs, list) else []:
        device = str(job.get("device", ""))
        if device.startswith(f"{JOB_PREFIX}-"):
            await blockjobs.cancel_and_wait(target, [device])
    nodes = await target.execute("query-named-block-nodes", {"flat": True})
    for node in nodes if isinstance(nodes, list) else []:
        node_name = str(node.get("node-name", ""))
        if re.fullmatch(rf"{JOB_PREFIX}-t\d+", node_name):
            with contextlib.suppress(VmrError):
                await target.execute("blockdev-del", {"node-name": node_name})


async def settle(target: QmpTarget, nodes: Sequence[str], generation: int) -> None:
    """Bring every disk back to exactly one recording bitmap, of ``generation``, losing nothing.

    Older generations belong to deltas already committed and are dropped; a newer one is what an
    uncommitted cycle started, and its bits are merged back. A missing or inconsistent bitmap of
    the committed generation cannot be trusted: :class:`ResyncRequired`.
    """
    await _clear_leftovers(target)
    current = name(generation)
    for node in nodes:
        gens = await _generations(target, node)
        mine = gens.get(generation)
        if mine is None or mine.get("inconsistent"):
            why = (
                "is missing"
                if mine is None
                else "is inconsistent (the disk was not closed cleanly)"
            )
            raise ResyncRequired(
                f"change tracking of {node} was lost (bitmap {current} {why}): a resynchronization is required"
            )
        newer = [g for g in gens if g > generation]
        if newer:
            sources = [name(g) for g in newer]
            await target.execute(
                "block-dirty-bitmap-merge", {"node": node, "target": current, "bitmaps": sources}
            )
        if not mine.get("recording"):
            await target.execute("block-dirty-bitmap-enable", {"node": node, "name": current})
        for g in gens:
            if g != generation:
                await target.execute("block-dirty-bitmap-remove", {"node": node, "name": name(g)})


async def rotate(target: QmpTarget, nodes: Sequence[str], generation: int, dests: Sequence[Path],
                 progress: Progress | None = None) -> None:  # fmt: skip
    """Cut the delta of ``generation`` into ``dests`` and start ``generation + 1`` at that instant."""
    await blockjobs.rotate_copy(
        target, nodes, dests, name(generation), name(generation + 1), progress, JOB_PREFIX
    )


async def drop(target: QmpTarget, nodes: Sequence[str], generation: int) -> None:
    """After the commit: the old generation's changes are safe in the pending log."""
    for node in nodes:
        with contextlib.suppress(QmpCommandError):
            await target.execute(
                "block-dirty-bitmap-remove", {"node": node, "name": name(generation)}
            )


async def remove_all(target: QmpTarget, nodes: Sequence[str]) -> None:
    for node in nodes:
        for g in await _generations(target, node):
            await target.execute("block-dirty-bitmap-remove", {"node": node, "name": name(g)})
