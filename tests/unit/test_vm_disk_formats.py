"""Each disk's format in the host's database (store/vms.py, migration 10 in store/db.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from vmreplica._internal.store import db as dbmod
from vmreplica._internal.store.db import Database
from vmreplica._internal.store.vms import VmRecord, VmStore


def old_database(path: Path) -> None:
    """A database as an agent of schema 9 left it, with one VM of one disk."""
    conn = sqlite3.connect(path, isolation_level=None)
    for i, script in enumerate(dbmod._MIGRATIONS[:9], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version={i}; COMMIT;")
    conn.execute(
        "INSERT INTO vms(id, name, cpus, memory_mb, state, vm_dir, created) "
        "VALUES('id1', 'app', 1, 256, 'Off', '/v/app', '2026-01-01T00:00:00')"
    )
    conn.execute("INSERT INTO vm_disks(vm_id, idx, path, owned) VALUES('id1', 0, '/d/a', 0)")
    conn.close()


def test_an_old_database_opens_with_formats_not_known_then_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old_database(path)
    store = VmStore(Database(path))
    rec = store.by_id("id1")
    assert rec is not None and rec.formats == (None,) and rec.format_of(0) is None
    store.set_format("id1", 0, "raw")
    store.set_format("id1", 0, "qcow2")  # recorded once: never told again
    rec = store.by_id("id1")
    assert rec is not None and rec.formats == ("raw",)


def test_a_new_vm_keeps_its_formats_and_new_disks_take_theirs(tmp_path: Path) -> None:
    database = Database(tmp_path / "state.db")
    store = VmStore(database)
    rec = VmRecord("id2", "b", 1, 256, None, None, None, "Off", Path("/v/b"),
                   (Path("/d/r"), Path("/d/q")), (False, True), ("raw", "qcow2"))  # fmt: skip
    with database.tx() as tx:
        store.insert(tx, rec)
    assert store.by_id("id2") == rec
    with database.tx() as tx:
        store.set_disks(tx, "id2", [Path("/d/t")], ["qcow2"])
    got = store.by_id("id2")
    assert got is not None and got.formats == ("qcow2",) and got.disks == (Path("/d/t"),)
