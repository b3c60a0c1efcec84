"""The target of `vm move` (engine/primary/move.py): a node that acquires a primary VM attaches
it from the shared storage.

Idempotent, so that a crash anywhere is finished by the next acquisition (the agent's start
takes its VMs again): the VM and its relationship are imported in one transaction unless this
node has them already, the VM is started if it ran on the source and is off here, the schedule
resumes, and the facts file records who attached it (the source waits for that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.primary.move import RUNNING, read_facts, write_facts
from vmreplica._internal.engine.primary.scheduler import Scheduler
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.store.replications import ReplicationRow, Settings
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.cluster")


def disk_formats(v: dict[str, Any]) -> list[str | None]:
    """The disks' formats the source recorded: never told here from a disk's first bytes,
    which are the guest's (drivers/libvirt/raw.py). A source of a version that sent none: not
    known (the driver tells them as that version did)."""
    disks, formats = v["disks"], v.get("formats")
    if not isinstance(formats, list) or len(formats) != len(disks):
        return [None] * len(disks)
    return [f if f in ("raw", "qcow2") else None for f in formats]


class Attach:
    def __init__(self, ctx: Context, vms: VmService, scheduler: Scheduler) -> None:
        self._ctx = ctx
        self._vms = vms
        self._scheduler = scheduler

    async def acquired(self, vm_id: str) -> bool:
        """This node now owns `vm_id`: if it is a primary VM moved here, attach it. False when
        `vm_id` is no primary VM of the registry (a replica: the caller's business)."""
        cluster = self._ctx.cluster
        if cluster is None:
            return False
        info = (await cluster.registered()).get(vm_id, {})
        where = info.get("primary")
        if not isinstance(where, str):
            return False
        path = Path(where)
        facts = read_facts(path)
        if facts is None or facts.get("to") != self._ctx.host or facts["vm"]["id"] != vm_id:
            return True  # never moved, or moved elsewhere: this node's own rows stand
        if facts.get("attached") == self._ctx.host:
            return True  # attached before (the agent restarted): the VM is as the operator left it
        try:
            await self._attach(vm_id, facts)
        except VmrError as e:
            self._ctx.events.record(
                "vm-attach-failed", f"cannot attach moved VM {facts['vm']['name']}: {e.message}",
                facts["vm"]["name"], "error",
            )  # fmt: skip
            write_facts(path, facts | {"error": e.message})
            return True
        rec = self._vms.by_id(vm_id)
        state = rec.state if rec is not None else ""
        write_facts(path, facts | {"attached": self._ctx.host, "state": state})
        return True

    async def _attach(self, vm_id: str, facts: dict[str, Any]) -> None:
        v = facts["vm"]
        if self._vms.by_id(vm_id) is None:
            for disk in v["disks"]:
                if not Path(disk).exists():
                    raise VmrError(f"disk {disk} is not in this node's view of the shared storage")
            with self._ctx.stores.db.tx() as tx:
                self._vms.register(
                    tx, v["id"], v["name"], v["cpus"], v["memory_mb"],
                    self._vms.vms_dir / v["name"], [Path(d) for d in v["disks"]],
                    v["kernel"], v["initrd"], v["append"], formats=disk_formats(v),
                )  # fmt: skip
                r = facts.get("replication")
                if r is not None:
                    r = dict(r) | {"primary_server": self._ctx.host}
                    r["settings"] = Settings(**r["settings"])
                    r["disks"] = tuple(r["disks"])
                    self._ctx.stores.replications.delete(tx, vm_id)
                    self._ctx.stores.replications.insert(tx, ReplicationRow(**r))
                self._ctx.events.record(
                    "vm-attached", f"VM {v['name']} moved here from node {facts.get('from')}",
                    v["name"], tx=tx,
                )  # fmt: skip
        rec = self._vms.by_id(vm_id)
        if rec is not None and facts.get("running") and rec.state != RUNNING:
            await self._vms.runtime.start(rec.name)
        row = self._ctx.stores.replications.find(vm_id)
        if row is not None and row.mode == "Primary" and row.state == State.REPLICATING:
            self._scheduler.run(vm_id)
