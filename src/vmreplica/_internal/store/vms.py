"""VM definitions: one row per VM and one per disk, in order."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vmreplica._internal.store.db import Database, Tx


@dataclasses.dataclass(frozen=True)
class VmRecord:
    id: str
    name: str
    cpus: int
    memory_mb: int
    kernel: str | None
    initrd: str | None
    append: str | None
    state: str
    vm_dir: Path
    disks: tuple[Path, ...]
    owned: tuple[bool, ...]  # made by the agent (deleted with the VM) or given to it
    # Each disk's format ("raw", "qcow2"); None where a database from before formats were
    # recorded does not say (engine/vms/formats.py tells it at the agent's start).
    formats: tuple[str | None, ...] = ()

    def format_of(self, index: int) -> str | None:
        return self.formats[index] if index < len(self.formats) else None


class VmStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def _record(self, row: sqlite3.Row) -> VmRecord:
        disks = self._db.query(
            "SELECT path, owned, format FROM vm_disks WHERE vm_id=? ORDER BY idx", (row["id"],)
        )
        return VmRecord(
            id=row["id"],
            name=row["name"],
            cpus=row["cpus"],
            memory_mb=row["memory_mb"],
            kernel=row["kernel"],
            initrd=row["initrd"],
            append=row["append"],
            state=row["state"],
            vm_dir=Path(row["vm_dir"]),
            disks=tuple(Path(d["path"]) for d in disks),
            owned=tuple(bool(d["owned"]) for d in disks),
            formats=tuple(d["format"] for d in disks),
        )

    def all(self) -> list[VmRecord]:
        return [self._record(r) for r in self._db.query("SELECT * FROM vms ORDER BY name")]

    def by_name(self, name: str) -> VmRecord | None:
        row = self._db.query_one("SELECT * FROM vms WHERE name=?", (name,))
        return None if row is None else self._record(row)

    def by_id(self, vm_id: str) -> VmRecord | None:
        row = self._db.query_one("SELECT * FROM vms WHERE id=?", (vm_id,))
        return None if row is None else self._record(row)

    def exists(
        self, name: str | None = None, vm_id: str | None = None, tx: Tx | None = None
    ) -> bool:
        """Whether a VM has this name or this id (inside ``tx`` when given)."""
        sql, params = "SELECT 1 FROM vms WHERE name=? OR id=?", (name, vm_id)
        found = tx.execute(sql, params).fetchone() if tx else self._db.query_one(sql, params)
        return found is not None

    def users_of(self, disk: Path, other_than: str | None = None) -> list[str]:
        """Ids of the VMs that have ``disk`` (as stored) among their disks."""
        return [
            r["vm_id"]
            for r in self._db.query("SELECT vm_id FROM vm_disks WHERE path=?", (str(disk),))
            if r["vm_id"] != other_than
        ]

    def all_disks(self) -> list[tuple[str, Path]]:
        return [
            (r["vm_id"], Path(r["path"]))
            for r in self._db.query("SELECT vm_id, path FROM vm_disks")
        ]

    def insert(self, tx: Tx, record: VmRecord, created: str | None = None) -> None:
        tx.execute(
            "INSERT INTO vms(id, name, cpus, memory_mb, kernel, initrd, append, state, vm_dir, "
            "created) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (record.id, record.name, record.cpus, record.memory_mb, record.kernel, record.initrd,
             record.append, record.state, str(record.vm_dir),
             created or datetime.now(UTC).isoformat(timespec="seconds")),
        )  # fmt: skip
        formats = record.formats or (None,) * len(record.disks)
        self._insert_disks(tx, record.id, record.disks, record.owned, formats)

    def set_disks(
        self, tx: Tx, vm_id: str, disks: Sequence[Path], formats: Sequence[str | None]
    ) -> None:
        tx.execute("DELETE FROM vm_disks WHERE vm_id=?", (vm_id,))
        self._insert_disks(tx, vm_id, tuple(disks), (False,) * len(disks), formats)

    def set_format(self, vm_id: str, index: int, fmt: str) -> None:
        """Record the format of a disk a database from before formats were recorded lacks."""
        with self._db.tx() as conn:
            conn.execute(
                "UPDATE vm_disks SET format=? WHERE vm_id=? AND idx=? AND format IS NULL",
                (fmt, vm_id, index),
            )

    def _insert_disks(
        self, tx: Tx, vm_id: str, disks: Sequence[Path], owned: Sequence[bool],
        formats: Sequence[str | None],
    ) -> None:  # fmt: skip
        for i, (path, mine, fmt) in enumerate(zip(disks, owned, formats, strict=True)):
            tx.execute(
                "INSERT INTO vm_disks(vm_id, idx, path, owned, format) VALUES(?,?,?,?,?)",
                (vm_id, i, str(path), int(mine), fmt),
            )

    def set_state(self, vm_id: str, state: str, tx: Tx | None = None) -> None:
        with self._db.in_tx(tx) as conn:
            conn.execute("UPDATE vms SET state=? WHERE id=?", (state, vm_id))

    def delete(self, tx: Tx, vm_id: str) -> None:
        tx.execute("DELETE FROM vms WHERE id=?", (vm_id,))
