"""Each disk's format, recorded with its VM (drivers/libvirt/raw.py says why it is never told
from the disk's first bytes once the disk is the guest's).

A database from before formats were recorded (schema 10) has none: at the agent's start each
is told once by the driver, from what it left for the disk in the VM's run directory (a raw
disk's metadata image), and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vmreplica._internal.engine.context import Context
from vmreplica._internal.ports.hypervisor import VmSpec
from vmreplica._internal.store.vms import VmStore
from vmreplica.errors import VmrError

log = logging.getLogger("vmreplica.vms")

CHAIN_FORMAT = "qcow2"  # disks the agent makes: new disks, overlays, replica chains


def formats_of(spec: VmSpec) -> tuple[str | None, ...]:
    """``spec``'s formats, one per disk (None where it gives none)."""
    return tuple(spec.formats[i] if i < len(spec.formats) else None for i in range(len(spec.disks)))


async def record_missing_formats(
    ctx: Context, store: VmStore, run_dir: Callable[[str], Path]
) -> None:
    for rec in store.all():
        for i, disk in enumerate(rec.disks):
            if rec.format_of(i) is not None or not disk.exists():
                continue
            try:
                fmt = await ctx.driver.disk_format(disk, run_dir(rec.id), i)
            except VmrError as e:
                log.warning("VM %s: cannot tell the format of disk %s: %s", rec.name, disk, e)
                continue
            store.set_format(rec.id, i, fmt)
            log.info("VM %s: disk %s recorded as %s", rec.name, disk, fmt)
