"""Replication relationships as rows (one per replicated VM on each side), the cycle log that
statistics come from, and the recovery points of replica VMs.

Typed in and out: a row is a :class:`ReplicationRow`, a change is a set of its fields
(:class:`RowChanges`), and the columns are this module's business. The state is not among the
changes: it moves only through :meth:`ReplicationStore.set_state`, which the engine calls with
the target its transition table chose (engine/states.py).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypedDict, Unpack

from vmreplica._internal.store.db import Database, Tx
from vmreplica.errors import NotFound

# ReplicationRow.initial_kind: how initial replication runs when it is not a plain network copy.
SEED = "seed"  # from a copy already on the replica, compared block by block (a resync of it)
OFFLINE = "offline"  # on external media, imported on the replica
# Over the network as compressed, resumable deltas (start-initial --compressed): a resync of the
# replica's empty chain, so the blocks that are not zero travel as ordinary deltas.
COMPRESSED = "compressed"
# What arrived of a plain network copy that was cut, kept on the replica as its chains' base
# (engine/replica/kept.py): the retry compares against it as against a seed.
KEPT = "kept"
COMPARED = (SEED, COMPRESSED, KEPT)  # the kinds that run as a resynchronization


@dataclasses.dataclass(frozen=True)
class Settings:
    """Per-VM replication settings that ``enable`` and ``set`` choose."""

    frequency_sec: int = 300
    recovery_history: int = 0
    snapshot_frequency_hour: int | None = None
    compression: bool = True
    auto_resynchronize: bool = False
    recovery_point_interval: int = 3600
    # Hyper-V's window for an automatic resynchronization, local time; it may wrap midnight.
    auto_resync_start: str = "18:30"
    auto_resync_end: str = "06:00"
    # Kerberos only: bodies GSS-wrapped with confidentiality, not just MIC'd (TLS always is).
    encrypt: bool = False
    max_bandwidth: int = 0  # bits per second this VM's replication may send; 0: no cap
    bandwidth_schedule: str | None = None  # bandwidth.Schedule text

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReplicationRow:
    vm_id: str
    vm_name: str
    mode: str  # "Primary" or "Replica": the side this host holds
    state: str  # a State value (engine/states.py)
    primary_server: str
    replica_server: str
    replica_port: int
    authentication_type: str
    settings: Settings
    disks: tuple[int, ...]
    trust_group: str | None
    auth_entry: str | None
    storage_dir: str | None
    sequence: int
    acked_sequence: int
    generation: int
    last_replication_time: str | None
    last_replication_size: int | None
    initial_progress: float | None
    initial_size: int | None
    enabled_time: str
    stats_since: str
    last_error: str | None
    send_failure: str | None
    last_rp_time: str | None
    next_rp_id: int
    failover_point: int | None = None
    test_vm_id: str | None = None
    test_point: int | None = None
    peer_port: int | None = None
    # Why the replica's recovery failed; set, the replica takes nothing until it is retried.
    quarantine: str | None = None
    # The kernel and initrd the primary announced, by kind: {"size": N, "blake3": HEX}.
    boot_files: str | None = None
    # A resynchronization: when it is to start, how far it got (percent), and the next block
    # to compare per replicated disk (JSON; None when none is under way).
    resync_at: str | None = None
    resync_progress: float | None = None
    resync_next: str | None = None
    # How initial replication runs when it is not a plain copy over the network: "seed" (from a
    # copy already on the replica, compared block by block) or "offline" (on external media).
    initial_kind: str | None = None
    # When a scheduled initial replication is to start (start-initial --start-time).
    initial_at: str | None = None
    # Offline media: the manifest the primary wrote (JSON), kept on both sides for the import.
    initial_media: str | None = None
    # Application-consistent points (--snapshot-frequency): when the guest was last asked to
    # freeze, and why the last attempt gave only a crash-consistent point (None: it did not).
    app_consistent_at: str | None = None
    consistency_warning: str | None = None

    @property
    def pinned(self) -> set[int]:
        """Recovery points an overlay stands on: pruning must wait for them."""
        return {p for p in (self.failover_point, self.test_point) if p is not None}


class RowChanges(TypedDict, total=False):
    """The fields of a row that may change after it is inserted; the state is not one of them."""

    vm_name: str
    mode: str
    primary_server: str
    replica_server: str
    replica_port: int
    authentication_type: str
    settings: Settings
    disks: tuple[int, ...]
    trust_group: str | None
    auth_entry: str | None
    storage_dir: str | None
    sequence: int
    acked_sequence: int
    generation: int
    last_replication_time: str | None
    last_replication_size: int | None
    initial_progress: float | None
    initial_size: int | None
    stats_since: str
    last_error: str | None
    send_failure: str | None
    last_rp_time: str | None
    next_rp_id: int
    failover_point: int | None
    test_vm_id: str | None
    test_point: int | None
    peer_port: int | None
    quarantine: str | None
    resync_at: str | None
    resync_progress: float | None
    resync_next: str | None
    initial_kind: str | None
    initial_at: str | None
    initial_media: str | None
    app_consistent_at: str | None
    consistency_warning: str | None


_SETTINGS_COLUMNS = (
    "frequency_sec", "recovery_history", "snapshot_frequency_hour", "compression",
    "auto_resynchronize", "recovery_point_interval", "auto_resync_start", "auto_resync_end",
    "encrypt", "max_bandwidth", "bandwidth_schedule",
)  # fmt: skip


def _columns(changes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "settings":
            out.update({c: getattr(value, c) for c in _SETTINGS_COLUMNS})
            out["compression"] = int(value.compression)
            out["auto_resynchronize"] = int(value.auto_resynchronize)
            out["encrypt"] = int(value.encrypt)
        elif key == "disks":
            out["disks"] = json.dumps(list(value))
        else:
            out[key] = value
    return out


def _row(r: sqlite3.Row) -> ReplicationRow:
    settings = Settings(
        frequency_sec=r["frequency_sec"],
        recovery_history=r["recovery_history"],
        snapshot_frequency_hour=r["snapshot_frequency_hour"],
        compression=bool(r["compression"]),
        auto_resynchronize=bool(r["auto_resynchronize"]),
        recovery_point_interval=r["recovery_point_interval"],
        auto_resync_start=r["auto_resync_start"],
        auto_resync_end=r["auto_resync_end"],
        encrypt=bool(r["encrypt"]),
        max_bandwidth=r["max_bandwidth"],
        bandwidth_schedule=r["bandwidth_schedule"],
    )
    plain = {
        f.name: r[f.name]
        for f in dataclasses.fields(ReplicationRow)
        if f.name not in ("settings", "disks")
    }
    return ReplicationRow(**plain, settings=settings, disks=tuple(json.loads(r["disks"])))


class ReplicationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[ReplicationRow]:
        return [_row(r) for r in self._db.query("SELECT * FROM replications ORDER BY vm_name")]

    def find(self, vm_id: str) -> ReplicationRow | None:
        r = self._db.query_one("SELECT * FROM replications WHERE vm_id=?", (vm_id,))
        return None if r is None else _row(r)

    def get(self, vm_id: str, vm_name: str) -> ReplicationRow:
        row = self.find(vm_id)
        if row is None:
            raise NotFound(f"replication is not enabled for VM {vm_name}")
        return row

    def insert(self, tx: Tx, row: ReplicationRow) -> None:
        values = _columns({f.name: getattr(row, f.name) for f in dataclasses.fields(row)})
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        tx.execute(f"INSERT INTO replications({names}) VALUES({marks})", tuple(values.values()))

    def update(self, vm_id: str, tx: Tx | None = None, **changes: Unpack[RowChanges]) -> None:
        self._set(vm_id, tx, _columns(changes))

    def set_state(self, vm_id: str, tx: Tx, state: str) -> None:
        self._set(vm_id, tx, {"state": str(state)})

    def _set(self, vm_id: str, tx: Tx | None, columns: dict[str, Any]) -> None:
        if not columns:
            return
        sql = "UPDATE replications SET " + ", ".join(f"{k}=?" for k in columns) + " WHERE vm_id=?"
        with self._db.in_tx(tx) as conn:
            conn.execute(sql, (*columns.values(), vm_id))

    def delete(self, tx: Tx, vm_id: str) -> None:
        tx.execute("DELETE FROM replications WHERE vm_id=?", (vm_id,))
        tx.execute("DELETE FROM cycles WHERE vm_id=?", (vm_id,))
        tx.execute("DELETE FROM recovery_points WHERE vm_id=?", (vm_id,))


@dataclasses.dataclass(frozen=True)
class CycleRow:
    start: datetime
    end: datetime | None
    size: int
    ok: bool
    missed: int  # periods skipped before this cycle could start
    error: str | None


@dataclasses.dataclass(frozen=True)
class CycleTotals:
    succeeded: int
    failed: int
    missed: int
    size: int  # data delivered
    wire: int  # bytes sent for the deliveries whose sender counted them
    wired_size: int  # the data of those same deliveries: wire / wired_size is the compression


class CycleStore:
    """One row per delivery (or failed attempt) of a cycle: what statistics are computed from."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        tx: Tx,
        vm_id: str,
        start: str,
        ok: bool,
        sequence: int | None = None,
        size: int = 0,
        missed: int = 0,
        error: str | None = None,
        wire: int | None = None,
    ) -> None:
        """``size``: the data of the delivery; ``wire``: the bytes its sender put on the network
        for it (compressed, framed), where the sender counted them."""
        tx.execute(
            "INSERT INTO cycles(vm_id, sequence, start, end, size, ok, missed, error, wire) "
            "VALUES(?,?,?,?,?,?,?,?,?)",
            (vm_id, sequence, start, datetime.now(UTC).isoformat(), size, int(ok), missed, error,
             wire),
        )  # fmt: skip

    def totals(self, vm_id: str, since: str) -> CycleTotals:
        """Counts and sums over every cycle since ``since`` (the statistics' reset)."""
        r = self._db.query_one(
            "SELECT COALESCE(SUM(ok), 0) AS ok, COALESCE(SUM(1 - ok), 0) AS failed, "
            "COALESCE(SUM(missed), 0) AS missed, COALESCE(SUM(CASE WHEN ok THEN size END), 0) "
            "AS size, COALESCE(SUM(wire), 0) AS wire, COALESCE(SUM(CASE WHEN wire IS NOT NULL "
            "THEN size END), 0) AS wired_size FROM cycles WHERE vm_id=? AND start>=?",
            (vm_id, since),
        )
        assert r is not None
        return CycleTotals(r["ok"], r["failed"], r["missed"], r["size"], r["wire"], r["wired_size"])

    def since(self, vm_id: str, since: str) -> list[CycleRow]:
        rows = self._db.query(
            "SELECT * FROM cycles WHERE vm_id=? AND start>=? ORDER BY id", (vm_id, since)
        )
        return [
            CycleRow(
                start=datetime.fromisoformat(r["start"]),
                end=datetime.fromisoformat(r["end"]) if r["end"] else None,
                size=r["size"],
                ok=bool(r["ok"]),
                missed=r["missed"],
                error=r["error"],
            )
            for r in rows
        ]

    def clear(self, tx: Tx, vm_id: str) -> None:
        tx.execute("DELETE FROM cycles WHERE vm_id=?", (vm_id,))


@dataclasses.dataclass(frozen=True)
class PointRow:
    id: int
    creation_time: str
    kind: str


class PointStore:
    """The recovery points of replica VMs (the images are the chain's; these are their facts)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self, vm_id: str) -> list[PointRow]:
        return [
            PointRow(r["id"], r["creation_time"], r["kind"])
            for r in self._db.query(
                "SELECT * FROM recovery_points WHERE vm_id=? ORDER BY id", (vm_id,)
            )
        ]

    def ids(self, vm_id: str) -> list[int]:
        return [p.id for p in self.all(vm_id)]

    def add(self, tx: Tx, vm_id: str, point: int, creation_time: str, kind: str) -> None:
        tx.execute(
            "INSERT OR IGNORE INTO recovery_points(vm_id, id, creation_time, kind) VALUES(?,?,?,?)",
            (vm_id, point, creation_time, kind),
        )

    def remove(self, tx: Tx, vm_id: str, point: int) -> None:
        tx.execute("DELETE FROM recovery_points WHERE vm_id=? AND id=?", (vm_id, point))

    def keep_only(self, tx: Tx, vm_id: str, point: int | None) -> None:
        """Delete every point of the VM but ``point`` (all of them when it is None)."""
        tx.execute("DELETE FROM recovery_points WHERE vm_id=? AND id IS NOT ?", (vm_id, point))
