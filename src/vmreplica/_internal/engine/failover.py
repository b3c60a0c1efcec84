"""Failover: planned (prepare on the primary, then fail over), unplanned (to a chosen recovery
point), test (a "<VM> - Test" VM beside the replica), and reversing the direction.

A failover VM always runs on new overlays above a recovery point, never on the chain itself: a
failover to "Latest" first freezes ``tip`` into a point. The point is pinned (recorded in the
replication row) so pruning leaves it alone until the failover is stopped, completed or
reversed. Each operation records its intent in the ``journal`` before touching files, and
:meth:`FailoverService.recover` rolls an interrupted one back (or finishes it) on restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu import blockjobs, nbd_extents, qemu_img, tracking
from vmreplica._internal.drivers.qemu.chain import ReplicaChain
from vmreplica._internal.drivers.qemu.nbd_extents import Extent
from vmreplica._internal.drivers.qemu.qsd import node_name
from vmreplica._internal.engine import repl_store as rs
from vmreplica._internal.engine.connect import peer_address
from vmreplica._internal.engine.events import EventLog, now_iso
from vmreplica._internal.engine.primary import PrimaryEngine
from vmreplica._internal.engine.replica import ReplicaEngine
from vmreplica._internal.engine.server import Authorization
from vmreplica._internal.engine.vms import VmRecord, VmService
from vmreplica._internal.store.db import Database
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import UNREACHABLE, PeerClient, PeerConnectionFailed
from vmreplica.errors import (
    AccessDenied,
    IntegrityError,
    InvalidArgument,
    InvalidState,
    NotFound,
    ResyncRequired,
    VmrError,
)

log = logging.getLogger("vmreplica.failover")

TEST_SUFFIX = " - Test"
FAILBACK_FILE = "failback-extents.json"  # in a completed failover's storage directory
NBD_SOCKET = "nbd.sock"  # in the VM's run directory, beside the storage daemon's monitor
_OVERLAY_DIRS = {"failover": "failover", "test-failover": "test"}  # in the replica storage


class FailoverService:
    def __init__(
        self, db: Database, events: EventLog, config: HostConfig, vms: VmService, primary: PrimaryEngine,
        replica: ReplicaEngine,
    ) -> None:  # fmt: skip
        self._db = db
        self._events = events
        self._config = config
        self._vms = vms
        self._primary = primary
        self._replica = replica
        self.store = primary.store

    def _row(self, name: str) -> tuple[VmRecord, rs.ReplicationRow]:
        rec = self._vms.find(name)
        return rec, self.store.get(rec.id, name)

    def _journal(self, kind: str, vm_id: str, data: dict[str, Any]) -> None:
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO journal(kind, subject, step, data, created) VALUES(?, ?, 'start', ?, ?)",
                (kind, vm_id, json.dumps(data), now_iso()),
            )

    def _unjournal(self, kind: str, vm_id: str) -> None:
        with self._db.tx() as conn:
            conn.execute("DELETE FROM journal WHERE kind=? AND subject=?", (kind, vm_id))

    # -- start -----------------------------------------------------------------------------

    async def start(
        self, name: str, prepare: bool, as_test: bool, point: str | None, force: bool
    ) -> rs.ReplicationRow:
        rec, row = self._row(name)
        if prepare:
            return await self._prepare(rec, row)
        if row.mode != rs.REPLICA:
            raise InvalidState(
                f"VM {name} is the primary here: fail over on its replica server {row.replica_server} "
                f"(on this host, `failover start {name} --prepare` prepares a planned failover)"
            )
        if row.state in (rs.WAITING_FOR_INITIAL,):
            raise InvalidState(
                f"replica VM {name} has no data yet: initial replication is not finished"
            )
        if as_test:
            return await self._test(rec, row, point)
        if row.state != rs.REPLICATING:
            raise InvalidState(f"replica VM {name} cannot fail over in state {row.state}")
        primary_check = await self._split_brain_guard(row, force)
        async with self._replica.lock(row.vm_id):
            chosen = await self._choose_point(row, point)
            self._journal("failover", row.vm_id, {"point": chosen})
            overlays = await self._overlays(row, chosen, "failover")
            faults.hit("failover.after_overlays")
            with self._db.tx() as conn:
                self._vms.set_disks(conn, row.vm_id, overlays)
                self.store.update(
                    row.vm_id, conn, state=rs.FAILED_OVER_WAITING, failover_point=chosen
                )
                conn.execute(
                    "DELETE FROM journal WHERE kind='failover' AND subject=?", (row.vm_id,)
                )
                self._events.record(
                    "failover-started",
                    f"{name} failed over to recovery point {chosen} ({primary_check}); start it "
                    f"with `vm start {name}`, then complete, stop or reverse the failover",
                    name,
                    conn=conn,
                )
        return self.store.get(row.vm_id, name)

    async def _prepare(self, rec: VmRecord, row: rs.ReplicationRow) -> rs.ReplicationRow:
        if row.mode != rs.PRIMARY:
            raise InvalidState(
                f"--prepare runs on the primary server of {rec.name}; this host holds its replica"
            )
        if rec.state != "Off":
            raise InvalidState(
                f"VM {rec.name} is running: a planned failover needs it off first (`vm stop {rec.name}`)"
            )
        if row.state != rs.REPLICATING:
            raise InvalidState(
                f"replication of {rec.name} must be Replicating to prepare a failover (it is {row.state})"
            )
        await self._primary.sync(rec.name)
        self.store.update(row.vm_id, state=rs.PREPARED_FOR_FAILOVER)
        self._events.record(
            "failover-prepared",
            f"planned failover of {rec.name} prepared: every change is on {row.replica_server}; fail over there now",
            rec.name,
        )
        return self.store.get(row.vm_id, rec.name)

    async def _split_brain_guard(self, row: rs.ReplicationRow, force: bool) -> str:
        """Ask the primary whether the VM runs there; returns what was found, in words.

        Failing over is refused while the VM runs on its primary, and also whenever the
        primary cannot be asked for another reason than being unreachable: its port unknown,
        TLS or authorization refused, an error. Only an unreachable primary (the disaster an
        unplanned failover is for) lets the failover go on without ``--force``.
        """
        primary = row.primary_server
        if force:
            return f"the primary {primary} was not asked whether {row.vm_name} runs there (--force)"
        if row.peer_port is None:
            raise InvalidState(
                f"cannot ask the primary {primary} whether {row.vm_name} runs there: it had no "
                "certificate listener when replication was enabled, so its port is unknown. Make "
                f"sure the VM is off on {primary}, then fail over with --force"
            )
        request = p.VmRequest(row.vm_id).to_json()
        try:
            address = peer_address(self._config, primary, row.peer_port)
            async with PeerClient(address, self._config.tls, 5) as c:
                answer = await c.call(p.VM_STATE, request)
        except PeerConnectionFailed as e:
            if e.stage != UNREACHABLE:
                raise InvalidState(
                    f"cannot ask the primary {primary} whether {row.vm_name} runs there "
                    f"({e.message}); make sure it is off there, then fail over with --force"
                ) from e
            return f"the primary {primary} is unreachable ({e.message}), so it was not asked"
        except VmrError as e:
            raise InvalidState(
                f"cannot ask the primary {primary} whether {row.vm_name} runs there "
                f"({e.message}); make sure it is off there, then fail over with --force"
            ) from e
        state = answer.get("state")
        if state == "Running":
            raise InvalidState(
                f"VM {row.vm_name} is running on its primary server {primary}: failing over now "
                "would run it twice (split brain); stop it there, or use --force"
            )
        return f"the primary {primary} says {row.vm_name} is {state}"

    async def _choose_point(self, row: rs.ReplicationRow, point: str | None) -> int:
        """The point to run on; "Latest" freezes ``tip`` first, as it is never a backing file."""
        if point is None or point.lower() == "latest":
            return await self._replica.freeze(row, "Standard")
        if not point.isdigit():
            raise InvalidArgument(
                f"invalid --recovery-point {point!r}: a point id from `recovery-point list`, or Latest"
            )
        ids = [
            r["id"]
            for r in self._db.query("SELECT id FROM recovery_points WHERE vm_id=?", (row.vm_id,))
        ]
        if int(point) not in ids:
            raise NotFound(
                f"no recovery point {point} for {row.vm_name}: see `recovery-point list {row.vm_name}`"
            )
        return int(point)

    async def _overlays(self, row: rs.ReplicationRow, point: int, kind: str) -> list[Path]:
        root = Path(str(row.storage_dir)) / kind
        shutil.rmtree(root, ignore_errors=True)
        return [
            await chain.overlay_for(point, root / f"disk{i}.qcow2")
            for i, chain in enumerate(self._replica.chains(row))
        ]

    async def _test(
        self, rec: VmRecord, row: rs.ReplicationRow, point: str | None
    ) -> rs.ReplicationRow:
        if row.test_vm_id is not None:
            raise InvalidState(
                f"a test failover of {rec.name} is already running: `failover stop {rec.name}` first"
            )
        test_name = rec.name + TEST_SUFFIX
        if self._db.query_one("SELECT 1 FROM vms WHERE name=?", (test_name,)):
            raise InvalidState(f"a VM named {test_name!r} already exists")
        async with self._replica.lock(row.vm_id):
            chosen = await self._choose_point(row, point)
            test_id = str(uuid.uuid4())
            self._journal("test-failover", row.vm_id, {"point": chosen, "test_vm_id": test_id})
            overlays = await self._overlays(row, chosen, "test")
            with self._db.tx() as conn:
                self._vms.register(
                    conn, test_id, test_name, rec.cpus, rec.memory_mb, Path(str(row.storage_dir)) / "test", overlays,
                    rec.kernel, rec.initrd, rec.append,
                )  # fmt: skip
                self.store.update(row.vm_id, conn, test_vm_id=test_id, test_point=chosen)
                conn.execute(
                    "DELETE FROM journal WHERE kind='test-failover' AND subject=?", (row.vm_id,)
                )
                self._events.record(
                    "test-failover-started",
                    f"test VM {test_name!r} created on recovery point {chosen}",
                    rec.name,
                    conn=conn,
                )
        return self.store.get(row.vm_id, rec.name)

    # -- stop and complete -----------------------------------------------------------------

    async def stop(self, name: str) -> rs.ReplicationRow:
        _rec, row = self._row(name)
        if row.test_vm_id is not None:
            await self._stop_test(row)
        elif row.mode == rs.REPLICA and row.state == rs.FAILED_OVER_WAITING:
            await self._vms.ensure_off(row.vm_id)
            chains = self._replica.chains(row)
            with self._db.tx() as conn:
                self._vms.set_disks(conn, row.vm_id, [c.tip for c in chains])
                self.store.update(row.vm_id, conn, state=rs.REPLICATING, failover_point=None)
                self._events.record(
                    "failover-stopped",
                    f"failover of {name} cancelled; the replica is as it was",
                    name,
                    conn=conn,
                )
            shutil.rmtree(Path(str(row.storage_dir)) / "failover", ignore_errors=True)
        elif row.mode == rs.PRIMARY and row.state == rs.PREPARED_FOR_FAILOVER:
            self.store.update(row.vm_id, state=rs.REPLICATING)
            self._primary.resume_schedule(row.vm_id)
            self._events.record("failover-stopped", f"planned failover of {name} cancelled", name)
        else:
            raise InvalidState(f"there is no failover of {name} to stop (state {row.state})")
        return self.store.get(row.vm_id, name)

    async def _stop_test(self, row: rs.ReplicationRow) -> None:
        assert row.test_vm_id is not None
        await self._vms.unregister(row.test_vm_id)
        shutil.rmtree(Path(str(row.storage_dir)) / "test", ignore_errors=True)
        self.store.update(row.vm_id, test_vm_id=None, test_point=None)
        self._events.record(
            "test-failover-stopped", f"test VM of {row.vm_name} removed", row.vm_name
        )

    async def complete(self, name: str) -> rs.ReplicationRow:
        _rec, row = self._row(name)
        if (
            row.mode != rs.REPLICA
            or row.state != rs.FAILED_OVER_WAITING
            or row.failover_point is None
        ):
            raise InvalidState(f"there is no failover of {name} to complete (state {row.state})")
        point = row.failover_point
        await self._save_changes_above_point(row)
        for chain in self._replica.chains(row):
            for other in chain.point_ids():
                if other > point:
                    chain.rp_path(other).unlink(missing_ok=True)
            chain.tip.unlink(missing_ok=True)
        with self._db.tx() as conn:
            conn.execute("DELETE FROM recovery_points WHERE vm_id=? AND id<>?", (row.vm_id, point))
            self.store.update(row.vm_id, conn, state=rs.FAILED_OVER)
            self._events.record(
                "failover-completed",
                f"failover of {name} completed on point {point}; other recovery points deleted",
                name,
                conn=conn,
            )
        return self.store.get(row.vm_id, name)

    async def _save_changes_above_point(self, row: rs.ReplicationRow) -> None:
        """Before completing deletes the images above the failover point: which ranges they
        held, for a later delta failback (the old primary has that data, the VM does not).

        A repeated complete (a crash mid-delete) merges with what an earlier run saved, since
        the images it already deleted are no longer there to read.
        """
        changes = await self._changes_above_point(row)
        assert changes is not None
        path = Path(str(row.storage_dir)) / FAILBACK_FILE
        if path.exists():
            earlier = _parse_extents(json.loads(path.read_text()), len(row.disks))
            changes = {
                n: nbd_extents.coalesce([*changes.get(n, []), *earlier.get(n, [])])
                for n in range(len(row.disks))
            }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(_extents_json(changes), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        blockjobs.fsync_dir(path.parent)

    # -- reverse ---------------------------------------------------------------------------

    async def reverse(
        self, name: str, replica_server: str | None, replica_port: int | None
    ) -> rs.ReplicationRow:
        """On the failed-over host: become the primary, the old primary becomes the replica.

        Only what differs between the two travels (a delta failback): what the VM wrote since
        the failover point (the top of its overlays), what the old primary holds that never
        reached the failover point (its unshipped writes, and the deltas the chain holds above
        that point), all read from this host's disks. The VM must be off: those extra ranges are
        read after the instant tracking starts, which only gives one consistent instant when
        nothing writes. It stays locked off until delta 1 is cut.
        """
        rec, row = self._row(name)
        self._check_reversible(row)
        server = replica_server or row.primary_server
        port = replica_port or row.peer_port
        if port is None:
            raise InvalidArgument(
                f"give --replica-port: the certificate port of {server} is not known here"
            )
        peer = peer_address(self._config, server, port)
        async with self._vms.lock(rec.id):
            rec, row = self._row(name)
            self._check_reversible(row)
            if rec.state != "Off":
                raise InvalidState(
                    f"VM {name} is running on {self._config.name}: stop it (`vm stop {name}`), then "
                    "reverse replication; the failback reads the disks at one instant, with nothing "
                    "writing to them, and the VM can start again right after"
                )
            here = await self._changes_above_point(row)
            request = p.ReverseRequest(
                vm_id=row.vm_id, vm_name=name, new_primary_port=self._primary.own_port(),
                failback_extents=True,  # this host takes the ranges of a delta failback
            )  # fmt: skip
            async with PeerClient(peer, self._config.tls) as client:
                answer = await client.call(p.REVERSE, request.to_json())
            extents, reason = _failback_extents(answer, here, len(row.disks))
            with self._db.tx() as conn:
                if reason is None:
                    data = json.dumps({"extents": _extents_json(extents)})
                    conn.execute(
                        "INSERT INTO journal(kind, subject, step, data, created) VALUES('reverse', ?, 'start', ?, ?)",
                        (row.vm_id, data, now_iso()),
                    )
                conn.execute("DELETE FROM recovery_points WHERE vm_id=?", (row.vm_id,))
                self.store.update(
                    row.vm_id, conn, mode=rs.PRIMARY, primary_server=self._config.name, replica_server=peer.fqdn,
                    replica_port=peer.port, sequence=0, acked_sequence=0, generation=0, failover_point=None,
                    peer_port=None, trust_group=None, auth_entry=None,
                    state=rs.REPLICATING if reason is None else rs.WAITING_FOR_RESYNC, last_error=reason,
                )  # fmt: skip
                self._events.record(
                    "replication-reversed",
                    f"{name} now replicates from {self._config.name} to {peer.fqdn}",
                    name,
                    conn=conn,
                )
            if row.storage_dir:  # what it said is in the journal now
                (Path(row.storage_dir) / FAILBACK_FILE).unlink(missing_ok=True)
            if reason is not None:
                raise ResyncRequired(
                    f"replication of {name} is reversed, but {peer.fqdn} cannot be brought up to date "
                    f"by a delta ({reason}): a resynchronization is required"
                )
            faults.hit("reverse.after_local")
            await self._failback_delta(row.vm_id, name, extents)
        await self._primary.sync_pending(name)
        return self.store.get(row.vm_id, name)

    @staticmethod
    def _check_reversible(row: rs.ReplicationRow) -> None:
        if row.mode != rs.REPLICA or row.state not in (rs.FAILED_OVER_WAITING, rs.FAILED_OVER):
            raise InvalidState(
                f"reverse replication runs on the host {row.vm_name} failed over to (state here: {row.state})"
            )

    async def _changes_above_point(self, row: rs.ReplicationRow) -> dict[int, list[Extent]] | None:
        """Per disk, what the replica chain received after the failover point: the old primary
        has it, the failed-over VM does not (it runs on that point). None when no longer known.

        Empty for a failover to "Latest", whose point was frozen from ``tip`` itself. A completed
        failover deleted those images, so :meth:`complete` saved their ranges first.
        """
        if row.state == rs.FAILED_OVER:
            saved = Path(str(row.storage_dir)) / FAILBACK_FILE
            try:
                return _parse_extents(json.loads(saved.read_text()), len(row.disks))
            except FileNotFoundError:
                return None  # completed by a version that did not save them
            except (OSError, ValueError, IntegrityError) as exc:
                log.warning("cannot read %s: %s", saved, exc)
                return None
        point = row.failover_point
        if point is None:
            return None
        changes: dict[int, list[Extent]] = {}
        for n, chain in enumerate(self._replica.chains(row)):
            layers = [chain.rp_path(k) for k in chain.point_ids() if k > point] + [chain.tip]
            found: list[Extent] = []
            for layer in layers:
                if layer.exists():
                    found += await _allocated(layer)
            changes[n] = nbd_extents.coalesce(found)
        return changes

    async def _failback_delta(
        self, vm_id: str, name: str, extents: Mapping[int, Sequence[Extent]]
    ) -> None:
        """Delta 1 of the reversed relationship, cut with the VM's lock held: the top of the
        overlays (what the VM wrote since the failover point) plus ``extents``, the ranges the
        new replica may hold differently, copied from this host's disks as they read now.

        Tracking generation 1 starts at the copy's instant; the extra ranges are read after it,
        which is the same instant only while nothing writes, hence a VM that is off. Should it
        run anyway (started between an interrupted reverse and its recovery), the delta cannot
        be exact and the relationship waits for a resynchronization instead.
        """
        row = self.store.get(vm_id, name)
        rec = self._vms.find(name)
        extra = {n: list(e) for n, e in extents.items() if e}
        if extra and self._vms.process(rec.id) is not None:
            reason = (
                f"VM {name} was started before the failback delta was cut, so the ranges "
                f"{row.replica_server} changed after the failover point cannot be read at one instant"
            )
            with self._db.tx() as conn:
                self.store.update(vm_id, conn, state=rs.WAITING_FOR_RESYNC, last_error=reason)
                conn.execute("DELETE FROM journal WHERE kind='reverse' AND subject=?", (vm_id,))
                self._events.record(
                    "resync-required", f"{reason}: a resynchronization is required", name, "error",
                    conn=conn,
                )  # fmt: skip
            raise ResyncRequired(f"{reason}: a resynchronization is required")
        delta_dir = self._primary.pending_dir(vm_id) / "1"
        shutil.rmtree(self._primary.pending_dir(vm_id), ignore_errors=True)
        delta_dir.mkdir(parents=True)
        async with self._primary.target(rec) as target:
            nodes = [node_name(i) for i in row.disks]
            dests = [delta_dir / f"disk{n}.qcow2" for n in range(len(nodes))]
            await tracking.start_from_top(target, nodes, dests)
            if extra:
                socket = self._vms.run_dir(rec.id) / NBD_SOCKET
                copied = await nbd_extents.copy_ranges(target, nodes, dests, extra, socket)
                log.info("failback delta of %s: %d bytes the old primary changed", name, copied)
        compression = "zstd" if row.settings.compression else "none"
        await wire.build_manifest(delta_dir, vm_id, 1, "CrashConsistent", compression)
        with self._db.tx() as conn:
            self.store.update(vm_id, conn, sequence=1, generation=1)
            conn.execute("DELETE FROM journal WHERE kind='reverse' AND subject=?", (vm_id,))
        self._primary.resume_schedule(vm_id)

    async def become_replica(
        self, authz: Authorization, peer_names: list[str], req: p.ReverseRequest
    ) -> dict[str, Any]:
        """On the old primary, asked by the host the VM failed over to.

        The answer names what this host may hold that the new primary does not (the ranges of
        a delta failback), or says that tracking was lost and only a resynchronization helps.
        """
        vm_id = req.vm_id
        row = self.store.find(vm_id)
        if row is None or row.mode != rs.PRIMARY:
            raise NotFound(f"{self._config.name} is not the primary of VM {req.vm_name}")
        if row.replica_server not in peer_names:
            raise InvalidState(
                f"VM {row.vm_name} replicates to {row.replica_server}, not to {peer_names[0]}"
            )
        rec = self._vms.find(row.vm_name)
        if rec.state != "Off":
            raise InvalidState(
                f"VM {row.vm_name} is running on {self._config.name}: stop it before reversing"
            )
        await self._primary.stop_schedule(vm_id)
        async with self._vms.lock(rec.id):  # no start, and no cycle, while the disks move
            rec, row = self._vms.find(row.vm_name), self.store.get(vm_id, row.vm_name)
            if rec.state != "Off":
                self._primary.resume_schedule(vm_id)
                raise InvalidState(
                    f"VM {row.vm_name} is running on {self._config.name}: stop it before reversing"
                )
            intact, reason, extents = await self._tracking_intact(rec, row)
            if intact and any(extents.values()) and not req.failback_extents:
                # An older new primary would ignore the ranges and silently leave them stale.
                intact, reason, extents = False, "it holds writes that were never replicated", {}
            await self._convert_to_replica(authz, peer_names, req, rec, row)
        return {"tracking_intact": intact, "reason": reason, "extents": extents}

    async def _convert_to_replica(
        self, authz: Authorization, peer_names: list[str], req: p.ReverseRequest, rec: VmRecord,
        row: rs.ReplicationRow,
    ) -> None:  # fmt: skip
        """Journaled: the disks move into replica chains; :meth:`recover` moves them back."""
        vm_id = row.vm_id
        storage = authz.storage_location / row.vm_name
        root = storage / f"rev-{uuid.uuid4().hex[:8]}"
        moves = [
            (str(rec.disks[i]), str(root / f"disk{n}" / "base.qcow2"))
            for n, i in enumerate(row.disks)
        ]
        self._journal("become-replica", vm_id, {"root": str(root), "moves": moves})
        chains: list[Path] = []
        for src, dst in moves:
            Path(dst).parent.mkdir(parents=True)
            os.replace(src, dst)
            chain = ReplicaChain(Path(dst).parent)
            await chain.recover()  # creates tip.qcow2 above the existing base
            chains.append(chain.tip)
        faults.hit("reverse.after_convert")
        with self._db.tx() as conn:
            conn.execute("DELETE FROM journal WHERE kind='become-replica' AND subject=?", (vm_id,))
            self._vms.set_disks(conn, vm_id, chains)
            conn.execute("DELETE FROM cycles WHERE vm_id=?", (vm_id,))
            self.store.update(
                vm_id, conn, mode=rs.REPLICA, state=rs.REPLICATING, primary_server=peer_names[0],
                replica_server=self._config.name, sequence=0, acked_sequence=0, generation=0,
                storage_dir=str(root), trust_group=authz.trust_group, auth_entry=authz.entry,
                peer_port=req.new_primary_port, last_replication_time=now_iso(), send_failure=None,
                last_error=None, disks=json.dumps(list(range(len(row.disks)))),
            )  # fmt: skip
            self._events.record(
                "replication-reversed",
                f"{row.vm_name} is now a replica of {peer_names[0]}",
                row.vm_name,
                conn=conn,
            )
        shutil.rmtree(self._primary.vm_dir(vm_id), ignore_errors=True)

    async def _tracking_intact(
        self, rec: VmRecord, row: rs.ReplicationRow
    ) -> tuple[bool, str | None, dict[str, list[list[int]]]]:
        """Whether this host can name every range the replica may lack, and those ranges.

        They are the bits of the current tracking generation (writes since the last delta was
        cut) and the clusters of the deltas still in the pending log (cut, maybe never applied).
        A delta failback over them is exact; without tracking, only a resynchronization is.
        """
        if row.state == rs.WAITING_FOR_RESYNC:
            return False, "its change tracking was lost", {}
        nodes = [node_name(i) for i in row.disks]
        try:
            async with self._primary.target(rec) as target:
                await tracking.settle(target, nodes, row.generation)
                socket = self._vms.run_dir(rec.id) / NBD_SOCKET
                changed = await nbd_extents.dirty_extents(
                    target, nodes, tracking.name(row.generation), socket
                )
        except ResyncRequired as e:
            return False, e.message, {}
        for sequence, delta_dir in self._primary.pending(row.vm_id):
            if not (delta_dir / wire.MANIFEST).exists():
                continue  # never committed: the bitmap still holds its bits (settle)
            for n in range(len(nodes)):
                try:
                    changed[n] += await _allocated(delta_dir / f"disk{n}.qcow2")
                except VmrError as e:
                    return False, f"pending delta {sequence} cannot be read ({e})", {}
        return True, None, _extents_json(dict(enumerate(changed)))

    # -- state of a VM, for a peer's split-brain check -------------------------------------

    async def vm_state(
        self, authz: Authorization, peer_names: list[str], req: p.VmRequest
    ) -> dict[str, Any]:
        """For a peer's split-brain check: only a peer this VM replicates with, or one of the
        replica's trust group, may learn whether it runs."""
        row = self.store.find(req.vm_id)
        related = row is not None and (
            row.replica_server in peer_names
            or row.primary_server in peer_names
            or (row.trust_group is not None and row.trust_group == authz.trust_group)
        )
        if row is None or not related:
            raise AccessDenied(
                f"not authorized: {peer_names[0] if peer_names else 'this peer'} has no "
                f"replication relationship with VM {req.vm_id} on {self._config.name}"
            )
        rec = self._vms.by_id(req.vm_id)
        return {"state": "Unknown" if rec is None else rec.state}

    def start_guard(self, vm: VmRecord) -> None:
        row = self.store.find(vm.id)
        if row is not None and row.mode == rs.PRIMARY and row.state == rs.PREPARED_FOR_FAILOVER:
            raise InvalidState(
                f"VM {vm.name} is prepared for a planned failover and cannot start here: fail it over on "
                f"{row.replica_server}, or cancel with `failover stop {vm.name}`"
            )

    async def recover(self) -> None:
        """Roll back a failover, test failover or conversion to a replica that a crash
        interrupted before it was recorded; finish a reverse whose failback delta was not cut.

        Each journal row is handled on its own: one that fails is reported and kept for the
        next start, and the agent starts anyway.
        """
        handlers = {
            "become-replica": self._recover_become_replica,
            "reverse": self._recover_reverse,
            "failover": self._recover_failover,
            "test-failover": self._recover_failover,
        }
        for kind, handler in handlers.items():
            for j in self._db.query("SELECT * FROM journal WHERE kind=?", (kind,)):
                try:
                    await handler(j["kind"], str(j["subject"]), json.loads(j["data"]))
                except Exception as e:
                    if not isinstance(e, VmrError):
                        log.exception("recovery of an interrupted %s failed", kind)
                    self._events.record(
                        "recovery-failed",
                        f"cannot finish an interrupted {kind} of VM {j['subject']} (retried at "
                        f"the next start): {e}",
                        level="error",
                    )

    async def _recover_become_replica(self, kind: str, vm_id: str, data: dict[str, Any]) -> None:
        for src, dst in data["moves"]:
            if Path(dst).exists() and not Path(src).exists():
                os.replace(dst, src)
        shutil.rmtree(data["root"], ignore_errors=True)
        self._unjournal(kind, vm_id)
        row = self.store.find(vm_id)
        if row is not None:
            self._primary.resume_schedule(row.vm_id)
            self._events.record(
                "recovered", f"rolled back an interrupted reverse of {row.vm_name}", row.vm_name
            )

    async def _recover_reverse(self, kind: str, vm_id: str, data: dict[str, Any]) -> None:
        row = self.store.find(vm_id)
        if row is None or row.mode != rs.PRIMARY:
            self._unjournal(kind, vm_id)
            return
        extents = _parse_extents(data.get("extents", {}), len(row.disks))
        rec = self._vms.find(row.vm_name)
        try:
            async with self._vms.lock(rec.id):
                await self._failback_delta(row.vm_id, row.vm_name, extents)
        except ResyncRequired:
            return  # recorded, and the state says so
        self._events.record(
            "recovered", f"finished an interrupted reverse of {row.vm_name}", row.vm_name
        )

    async def _recover_failover(self, kind: str, vm_id: str, data: dict[str, Any]) -> None:
        row = self.store.find(vm_id)
        if row is not None and row.storage_dir:
            shutil.rmtree(Path(row.storage_dir) / _OVERLAY_DIRS[kind], ignore_errors=True)
            if kind == "test-failover" and data.get("test_vm_id"):
                await self._vms.unregister(str(data["test_vm_id"]))
            self._events.record(
                "recovered", f"rolled back an interrupted {kind} of {row.vm_name}", row.vm_name
            )
        self._unjournal(kind, vm_id)


async def _allocated(image: Path) -> list[Extent]:
    """The ranges ``image`` itself holds, data or zero clusters (a zeroed range is a change too);
    not what shows through from below, nor the unallocated rest, which ``qemu-img map`` also
    reports as zero."""
    return nbd_extents.coalesce(
        (e.start, e.length) for e in await qemu_img.map(image) if e.present and e.depth == 0
    )


def _extents_json(extents: Mapping[int, Sequence[Extent]]) -> dict[str, list[list[int]]]:
    """Keyed by the disk's position in the replication (``disk{n}`` of a delta)."""
    return {
        str(n): [[offset, length] for offset, length in nbd_extents.coalesce(e)]
        for n, e in extents.items()
    }


def _parse_extents(data: object, disks: int) -> dict[int, list[Extent]]:
    """Inverse of :func:`_extents_json`; anything else is refused, never half used."""
    if not isinstance(data, dict):
        raise IntegrityError("failback ranges are not an object")
    out: dict[int, list[Extent]] = {}
    for key, ranges in data.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < disks):
            raise IntegrityError(f"failback ranges name an unknown disk {key!r}")
        if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int and v >= 0 for v in r)
            for r in ranges
        ):
            raise IntegrityError(f"failback ranges of disk {key} are malformed")
        out[int(key)] = nbd_extents.coalesce(ranges)
    return out


def _failback_extents(
    answer: Mapping[str, Any], here: Mapping[int, Sequence[Extent]] | None, disks: int
) -> tuple[dict[int, list[Extent]], str | None]:
    """What delta 1 must carry beyond the overlays' top, or why no delta can be exact.

    The union of what the old primary says it holds unshipped and what the replica chain
    received after the failover point; both are read from this host's disks.
    """
    if not answer.get("tracking_intact"):
        return {}, str(answer.get("reason") or "its change tracking was lost")
    if here is None:
        return {}, (
            "the failover was completed, and the recovery points after its point were deleted "
            "without recording what they changed"
        )
    try:
        there = _parse_extents(answer.get("extents") or {}, disks)
    except IntegrityError as exc:
        return {}, f"its answer was unusable: {exc}"
    return {
        n: nbd_extents.coalesce([*here.get(n, []), *there.get(n, [])]) for n in range(disks)
    }, None
