"""``replication enable`` and ``replication set`` on the primary.

Enabling checks the connection and the replica's authorization first, then has the replica make
its placeholder VM (and copy the kernel and initrd the VM boots with, checked by hash), and only
then records the relationship here: a refusal anywhere leaves nothing on this host.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import blake3

from vmreplica._internal import definition, validate
from vmreplica._internal.engine.connect import authentication_type, peer_address
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import now_iso
from vmreplica._internal.engine.primary.move import claim
from vmreplica._internal.engine.states import State
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.store.replications import ReplicationRow, Settings
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import KERBEROS, open_peer
from vmreplica.errors import InvalidArgument, InvalidState, StorageError


class PrimaryEnable:
    def __init__(self, ctx: Context, vms: VmService, kick: Callable[[str], None]) -> None:
        self._ctx = ctx
        self._vms = vms
        self._kick = kick  # the scheduler's: a settings change takes effect at once
        self._store = ctx.stores.replications

    async def enable(
        self, name: str, replica_server: str, replica_port: int, auth: str, settings: Settings,
        exclude_disks: list[str],
    ) -> ReplicationRow:  # fmt: skip
        auth = authentication_type(auth)
        settings = dataclasses.replace(
            settings, bandwidth_schedule=settings.bandwidth_schedule or None
        )
        validate.replication_settings(settings)
        _check_encrypt(auth, settings)
        rec = self._vms.find(name)
        if self._store.find(rec.id) is not None:
            raise InvalidState(f"replication is already enabled for VM {name}")
        excluded = {str(Path(d).absolute()) for d in exclude_disks}
        unknown = excluded - {str(d) for d in rec.disks}
        if unknown:
            raise InvalidArgument(f"--exclude-disk {sorted(unknown)[0]}: not a disk of VM {name}")
        disks = tuple(i for i, d in enumerate(rec.disks) if str(d) not in excluded)
        if not disks:
            raise InvalidArgument(f"VM {name} would have no disk left to replicate")
        await claim(self._ctx, rec)  # a node of a cluster: only the VM's owner replicates it
        sizes = [await self._ctx.driver.virtual_size(rec.disks[i], rec.format_of(i)) for i in disks]
        peer = peer_address(self._ctx.config, replica_server, replica_port, auth, settings.encrypt)
        row = ReplicationRow(
            vm_id=rec.id, vm_name=name, mode="Primary", state=State.READY_FOR_INITIAL,
            primary_server=self._ctx.host, replica_server=peer.fqdn, replica_port=peer.port,
            authentication_type=auth, settings=settings, disks=disks, trust_group=None,
            auth_entry=None, storage_dir=None, sequence=0, acked_sequence=0, generation=0,
            last_replication_time=None, last_replication_size=None, initial_progress=None,
            initial_size=None, enabled_time=now_iso(), stats_since=now_iso(), last_error=None,
            send_failure=None, last_rp_time=None, next_rp_id=1,
        )  # fmt: skip
        boot = {
            kind: Path(path)
            for kind, path in (("kernel", rec.kernel), ("initrd", rec.initrd))
            if path is not None
        }
        digests = {kind: await asyncio.to_thread(_digest, path) for kind, path in boot.items()}
        xml = await self._ctx.driver.definition(rec.id)  # libvirt's domain XML, or none
        if xml is not None:
            definition.check(xml, rec.id, len(rec.disks))
            xml = definition.only_disks(xml, disks)
        request = p.EnableRequest(
            vm_id=rec.id, vm_name=name, cpus=rec.cpus, memory_mb=rec.memory_mb,
            disk_sizes=tuple(sizes), settings=p.SettingsBody(**settings.to_json()),
            replica_port=peer.port, primary_port=self._ctx.own_port(auth), append=rec.append,
            kernel=digests.get("kernel"), initrd=digests.get("initrd"), definition=xml,
        )  # fmt: skip
        async with open_peer(peer, self._ctx.config.credentials) as replica:
            await replica.hello()
            answer = await replica.enable(request)
            for kind, path in boot.items():  # the replica boots its own copy after a failover
                await replica.boot_file(rec.id, kind, _chunks(path))
        with self._ctx.stores.db.tx() as tx:
            self._store.insert(tx, row)
            self._ctx.events.record(
                "replication-enabled",
                f"replication of {name} to {peer.fqdn}:{peer.port} enabled (replica storage "
                f"{answer.storage_dir})",
                name,
                tx=tx,
            )
        return self._store.get(rec.id, name)

    async def set(self, name: str, changes: dict[str, Any]) -> ReplicationRow:
        rec = self._vms.find(name)
        row = self._store.get(rec.id, name)
        current = row.settings.to_json()
        current.update({k: v for k, v in changes.items() if v is not None})
        current["bandwidth_schedule"] = current.get("bandwidth_schedule") or None  # "" clears
        settings = validate.replication_settings(Settings(**current))
        _check_encrypt(row.authentication_type, settings)
        self._store.update(rec.id, settings=settings)
        self._ctx.events.record(
            "replication-changed", f"replication settings of {name} changed", name
        )
        self._kick(rec.id)
        return self._store.get(rec.id, name)


def _check_encrypt(auth: str, settings: Settings) -> None:
    if settings.encrypt and auth != KERBEROS:
        raise InvalidArgument(
            "--encrypt is for Kerberos: replication with certificates is always encrypted (TLS)"
        )


def _digest(path: Path) -> p.BootFileInfo:
    try:
        size = path.stat().st_size
        digest = blake3.blake3().update_mmap(str(path)).hexdigest()
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
    return p.BootFileInfo(size, digest)


async def _chunks(path: Path, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while data := await asyncio.to_thread(f.read, chunk):
            yield data
