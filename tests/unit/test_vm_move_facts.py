"""The facts file `vm move` leaves beside a VM's first disk (engine/primary/move.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from vmreplica._internal.engine.primary import attach, move
from vmreplica._internal.store.vms import VmRecord
from vmreplica.errors import InvalidState, StorageError


def record(disk: Path) -> VmRecord:
    return VmRecord("1234-abcd", "app", 1, 256, None, None, None, "Off", disk.parent, (disk,),
                    (False,))  # fmt: skip


def test_the_facts_lie_beside_the_first_disk_and_are_replaced_whole(tmp_path: Path) -> None:
    path = move.facts_path(record(tmp_path / "app.qcow2"))
    assert path == tmp_path / ".vmreplica-1234-abcd.json"
    assert move.read_facts(path) is None
    move.write_facts(path, {"to": "b", "running": True})
    move.write_facts(path, {"to": "b", "running": True, "attached": "b"})
    assert move.read_facts(path) == {"to": "b", "running": True, "attached": "b"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    path.write_text("{half")
    with pytest.raises(StorageError, match="unreadable"):
        move.read_facts(path)


def test_the_source_waits_for_the_target_and_reports_its_error(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    move.write_facts(path, {"to": "b", "attached": "b", "state": "Running"})
    assert asyncio.run(move.wait_attached(path, "b", 1))["state"] == "Running"
    move.write_facts(path, {"to": "b", "error": "disk /x is not in this node's view"})
    with pytest.raises(InvalidState, match="could not attach it: disk /x"):
        asyncio.run(move.wait_attached(path, "b", 1))
    move.write_facts(path, {"to": "b"})
    with pytest.raises(InvalidState, match="has not attached it within 0 s"):
        asyncio.run(move.wait_attached(path, "b", 0.3))


def test_the_facts_carry_each_disks_recorded_format_to_the_target(tmp_path: Path) -> None:
    """The target has no metadata image of a raw disk: its format comes with the facts, and a
    malformed one is not known (never a format the facts' writer made up)."""
    rec = dataclasses.replace(
        record(tmp_path / "app.raw"),
        disks=(tmp_path / "app.raw", tmp_path / "b.qcow2"),
        owned=(False, False),
        formats=("raw", "qcow2"),
    )
    facts = move.vm_facts(rec)
    assert attach.disk_formats(facts) == ["raw", "qcow2"]
    assert attach.disk_formats(facts | {"formats": ["vmdk", "raw"]}) == [None, "raw"]
    assert attach.disk_formats(facts | {"formats": ["raw"]}) == [None, None]
    assert attach.disk_formats({k: v for k, v in facts.items() if k != "formats"}) == [None, None]
