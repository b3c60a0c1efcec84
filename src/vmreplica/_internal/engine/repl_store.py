"""Replication relationships as rows: one per replicated VM on each side, plus the cycle log
that statistics are computed from. Shared by the primary and the replica engines."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vmreplica._internal.engine.health import Cycle
from vmreplica._internal.store.db import Database
from vmreplica.errors import InvalidArgument, NotFound

PRIMARY, REPLICA = "Primary", "Replica"

DISABLED = "Disabled"
READY_FOR_INITIAL = "ReadyForInitialReplication"
INITIAL_IN_PROGRESS = "InitialReplicationInProgress"
WAITING_FOR_INITIAL = "WaitingForInitialReplication"
REPLICATING = "Replicating"
SUSPENDED = "Suspended"
ERROR = "Error"
WAITING_FOR_RESYNC = "WaitingForStartResynchronize"
RESYNCHRONIZING = "Resynchronizing"
RESYNC_SUSPENDED = "ResynchronizeSuspended"
PREPARED_FOR_FAILOVER = "PreparedForFailover"
FAILED_OVER_WAITING = "FailedOverWaitingCompletion"
FAILED_OVER = "FailedOver"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Per-VM replication settings that ``enable`` and ``set`` choose."""

    frequency_sec: int = 300
    recovery_history: int = 0
    snapshot_frequency_hour: int | None = None
    compression: bool = True
    auto_resynchronize: bool = False
    recovery_point_interval: int = 3600


FREQUENCIES = (30, 300, 900)
MAX_RECOVERY_POINT_INTERVAL = 86400


def check_settings(s: Settings) -> Settings:
    """Hyper-V's rules for per-VM settings, for ``enable``/``set`` and for what a peer sends."""
    if s.frequency_sec not in FREQUENCIES:
        raise InvalidArgument(
            f"invalid replication frequency {s.frequency_sec}: use 30, 300 or 900 seconds"
        )
    if not 0 <= s.recovery_history <= 24:
        raise InvalidArgument(
            f"invalid recovery history {s.recovery_history}: use 0 to 24 additional points"
        )
    if s.snapshot_frequency_hour is not None:
        if not 1 <= s.snapshot_frequency_hour <= 12:
            raise InvalidArgument("invalid --snapshot-frequency: use 1 to 12 hours")
        if s.recovery_history == 0:
            raise InvalidArgument("--snapshot-frequency needs --recovery-history above 0")
    if not 1 <= s.recovery_point_interval <= MAX_RECOVERY_POINT_INTERVAL:
        raise InvalidArgument(
            f"invalid --recovery-point-interval {s.recovery_point_interval}: use 1 to "
            f"{MAX_RECOVERY_POINT_INTERVAL} seconds"
        )
    return s


@dataclasses.dataclass(frozen=True)
class ReplicationRow:
    vm_id: str
    vm_name: str
    mode: str
    state: str
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

    @property
    def pinned(self) -> set[int]:
        """Recovery points an overlay stands on: pruning must wait for them."""
        return {p for p in (self.failover_point, self.test_point) if p is not None}


def _row(r: sqlite3.Row) -> ReplicationRow:
    return ReplicationRow(
        vm_id=r["vm_id"],
        vm_name=r["vm_name"],
        mode=r["mode"],
        state=r["state"],
        primary_server=r["primary_server"],
        replica_server=r["replica_server"],
        replica_port=r["replica_port"],
        authentication_type=r["authentication_type"],
        settings=Settings(
            frequency_sec=r["frequency_sec"],
            recovery_history=r["recovery_history"],
            snapshot_frequency_hour=r["snapshot_frequency_hour"],
            compression=bool(r["compression"]),
            auto_resynchronize=bool(r["auto_resynchronize"]),
            recovery_point_interval=r["recovery_point_interval"],
        ),
        disks=tuple(json.loads(r["disks"])),
        trust_group=r["trust_group"],
        auth_entry=r["auth_entry"],
        storage_dir=r["storage_dir"],
        sequence=r["sequence"],
        acked_sequence=r["acked_sequence"],
        generation=r["generation"],
        last_replication_time=r["last_replication_time"],
        last_replication_size=r["last_replication_size"],
        initial_progress=r["initial_progress"],
        initial_size=r["initial_size"],
        enabled_time=r["enabled_time"],
        stats_since=r["stats_since"],
        last_error=r["last_error"],
        send_failure=r["send_failure"],
        last_rp_time=r["last_rp_time"],
        next_rp_id=r["next_rp_id"],
        failover_point=r["failover_point"],
        test_vm_id=r["test_vm_id"],
        test_point=r["test_point"],
        peer_port=r["peer_port"],
        quarantine=r["quarantine"],
        boot_files=r["boot_files"],
    )


class ReplicationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[ReplicationRow]:
        return [_row(r) for r in self.db.query("SELECT * FROM replications ORDER BY vm_name")]

    def find(self, vm_id: str) -> ReplicationRow | None:
        r = self.db.query_one("SELECT * FROM replications WHERE vm_id=?", (vm_id,))
        return None if r is None else _row(r)

    def get(self, vm_id: str, vm_name: str) -> ReplicationRow:
        row = self.find(vm_id)
        if row is None:
            raise NotFound(f"replication is not enabled for VM {vm_name}")
        return row

    def insert(self, conn: sqlite3.Connection, row: ReplicationRow) -> None:
        s = row.settings
        conn.execute(
            "INSERT INTO replications(vm_id, vm_name, mode, state, primary_server, replica_server, "
            "replica_port, authentication_type, frequency_sec, recovery_history, "
            "snapshot_frequency_hour, compression, disks, auto_resynchronize, "
            "recovery_point_interval, trust_group, auth_entry, storage_dir, enabled_time, stats_since, "
            "peer_port, boot_files) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.vm_id, row.vm_name, row.mode, row.state, row.primary_server, row.replica_server,
                row.replica_port, row.authentication_type, s.frequency_sec, s.recovery_history,
                s.snapshot_frequency_hour, int(s.compression), json.dumps(list(row.disks)),
                int(s.auto_resynchronize), s.recovery_point_interval, row.trust_group, row.auth_entry,
                row.storage_dir, row.enabled_time, row.stats_since, row.peer_port, row.boot_files,
            ),
        )  # fmt: skip

    def update(self, vm_id: str, conn: sqlite3.Connection | None = None, **fields: Any) -> None:
        if "settings" in fields:
            s: Settings = fields.pop("settings")
            fields.update(
                frequency_sec=s.frequency_sec,
                recovery_history=s.recovery_history,
                snapshot_frequency_hour=s.snapshot_frequency_hour,
                compression=int(s.compression),
                auto_resynchronize=int(s.auto_resynchronize),
                recovery_point_interval=s.recovery_point_interval,
            )
        sql = "UPDATE replications SET " + ", ".join(f"{k}=?" for k in fields) + " WHERE vm_id=?"
        params = (*fields.values(), vm_id)
        if conn is not None:
            conn.execute(sql, params)
        else:
            with self.db.tx() as c:
                c.execute(sql, params)

    def delete(self, conn: sqlite3.Connection, vm_id: str) -> None:
        conn.execute("DELETE FROM replications WHERE vm_id=?", (vm_id,))
        conn.execute("DELETE FROM cycles WHERE vm_id=?", (vm_id,))
        conn.execute("DELETE FROM recovery_points WHERE vm_id=?", (vm_id,))

    # -- cycles ----------------------------------------------------------------------------

    def record_cycle(
        self,
        conn: sqlite3.Connection,
        vm_id: str,
        start: str,
        ok: bool,
        sequence: int | None = None,
        size: int = 0,
        missed: int = 0,
        error: str | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO cycles(vm_id, sequence, start, end, size, ok, missed, error) VALUES(?,?,?,?,?,?,?,?)",
            (vm_id, sequence, start, datetime.now(UTC).isoformat(), size, int(ok), missed, error),
        )

    def cycles(self, vm_id: str, since: str) -> Sequence[Cycle]:
        rows = self.db.query(
            "SELECT * FROM cycles WHERE vm_id=? AND start>=? ORDER BY id", (vm_id, since)
        )
        out: list[Cycle] = []
        for r in rows:
            out.append(
                Cycle(
                    start=datetime.fromisoformat(r["start"]),
                    end=datetime.fromisoformat(r["end"]) if r["end"] else None,
                    size=r["size"],
                    ok=bool(r["ok"]),
                    missed=False,
                    error=r["error"],
                )
            )
            # A late cycle records how many periods it skipped; each counts as one missed cycle.
            for _ in range(r["missed"]):
                out.append(
                    Cycle(start=out[-1].start, end=None, size=0, ok=False, missed=True, error=None)
                )
        return out
