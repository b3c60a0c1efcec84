"""The host's state: one SQLite database in WAL mode under the state directory.

Schema changes go through ``_MIGRATIONS`` keyed by ``PRAGMA user_version`` so that an agent
upgraded in place opens an older database. Every write happens inside :meth:`Database.tx`, which
commits or rolls back as a whole; multi-step operations that also touch files record their intent
in the ``journal`` table in the same transaction as their first step.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmreplica.errors import StorageError

# A write transaction in progress: what repositories take to make several changes one. The
# engine passes it along without looking inside.
Tx = sqlite3.Connection

_MIGRATIONS: list[str] = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE auth_entries (
        allowed_primary TEXT PRIMARY KEY,
        storage_location TEXT NOT NULL,
        trust_group TEXT NOT NULL
    );
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        kernel TEXT, initrd TEXT, append TEXT,
        state TEXT NOT NULL,
        vm_dir TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE vm_disks (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        path TEXT NOT NULL,
        owned INTEGER NOT NULL,
        PRIMARY KEY (vm_id, idx)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        vm_name TEXT,
        message TEXT NOT NULL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        step TEXT NOT NULL,
        data TEXT NOT NULL,
        created TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE replications (
        vm_id TEXT PRIMARY KEY,
        vm_name TEXT NOT NULL,
        mode TEXT NOT NULL,
        state TEXT NOT NULL,
        primary_server TEXT NOT NULL,
        replica_server TEXT NOT NULL,
        replica_port INTEGER NOT NULL,
        authentication_type TEXT NOT NULL,
        frequency_sec INTEGER NOT NULL,
        recovery_history INTEGER NOT NULL,
        snapshot_frequency_hour INTEGER,
        compression INTEGER NOT NULL,
        disks TEXT NOT NULL,
        auto_resynchronize INTEGER NOT NULL,
        recovery_point_interval INTEGER NOT NULL,
        trust_group TEXT,
        auth_entry TEXT,
        storage_dir TEXT,
        sequence INTEGER NOT NULL DEFAULT 0,
        acked_sequence INTEGER NOT NULL DEFAULT 0,
        generation INTEGER NOT NULL DEFAULT 0,
        last_replication_time TEXT,
        last_replication_size INTEGER,
        initial_progress REAL,
        initial_size INTEGER,
        enabled_time TEXT NOT NULL,
        stats_since TEXT NOT NULL,
        last_error TEXT,
        send_failure TEXT,
        last_rp_time TEXT,
        next_rp_id INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        sequence INTEGER,
        start TEXT NOT NULL,
        end TEXT,
        size INTEGER NOT NULL DEFAULT 0,
        ok INTEGER NOT NULL,
        missed INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX cycles_vm ON cycles(vm_id, start);
    CREATE TABLE recovery_points (
        vm_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        creation_time TEXT NOT NULL,
        kind TEXT NOT NULL,
        PRIMARY KEY (vm_id, id)
    );
    """,
    """
    ALTER TABLE replications ADD COLUMN failover_point INTEGER;
    ALTER TABLE replications ADD COLUMN test_vm_id TEXT;
    ALTER TABLE replications ADD COLUMN test_point INTEGER;
    ALTER TABLE replications ADD COLUMN peer_port INTEGER;
    """,
    """
    ALTER TABLE replications ADD COLUMN quarantine TEXT;
    ALTER TABLE replications ADD COLUMN boot_files TEXT;
    """,
    """
    ALTER TABLE replications ADD COLUMN resync_at TEXT;
    ALTER TABLE replications ADD COLUMN resync_progress REAL;
    ALTER TABLE replications ADD COLUMN resync_next TEXT;
    ALTER TABLE replications ADD COLUMN auto_resync_start TEXT NOT NULL DEFAULT '18:30';
    ALTER TABLE replications ADD COLUMN auto_resync_end TEXT NOT NULL DEFAULT '06:00';
    """,
    """
    ALTER TABLE replications ADD COLUMN initial_kind TEXT;
    ALTER TABLE replications ADD COLUMN initial_at TEXT;
    ALTER TABLE replications ADD COLUMN initial_media TEXT;
    """,
    """
    ALTER TABLE cycles ADD COLUMN wire INTEGER;
    ALTER TABLE replications ADD COLUMN app_consistent_at TEXT;
    ALTER TABLE replications ADD COLUMN consistency_warning TEXT;
    """,
    # 8: Kerberos relationships may encrypt their bodies (GSS wrap).
    """
    ALTER TABLE replications ADD COLUMN encrypt INTEGER NOT NULL DEFAULT 0;
    """,
    # 9: bandwidth limits per VM.
    """
    ALTER TABLE replications ADD COLUMN max_bandwidth INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE replications ADD COLUMN bandwidth_schedule TEXT;
    """,
    # 10: each disk's format ("raw", "qcow2"), told once when the disk is given to the VM and
    # never from its first bytes again (drivers/libvirt/raw.py). NULL in a database from before:
    # the agent tells it at its first start (engine/vms/formats.py).
    """
    ALTER TABLE vm_disks ADD COLUMN format TEXT;
    """,
]


class Database:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in tx()).
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as e:
            raise StorageError(f"cannot open state database {path}: {e}") from e

    def _migrate(self) -> None:
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        for i, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self.conn.executescript(f"BEGIN; {script}; PRAGMA user_version={i}; COMMIT;")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction; an exception rolls everything back."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StorageError(f"state database unavailable: {e}") from e
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                self.conn.execute("ROLLBACK")
                raise StorageError(f"state database write failed: {e}") from e

    @contextmanager
    def in_tx(self, tx: Tx | None) -> Iterator[Tx]:
        """The caller's transaction when it has one, else a transaction of its own."""
        if tx is not None:
            yield tx
        else:
            with self.tx() as own:
                yield own

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self.conn.execute(sql, params))

    def query_one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.query_one("SELECT value FROM settings WHERE key=?", (key,))
        return default if row is None else json.loads(row["value"])

    def close(self) -> None:
        self.conn.close()


def put_setting(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute(
        "INSERT INTO settings(key, value) VALUES(?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (key, json.dumps(value)),
    )
