"""The replication protocol between host agents: its routes and the typed body of each.

Route paths are defined here once, for the client (the engine, through
:mod:`vmreplica._internal.transport.peer`) and the listener (:mod:`vmreplica._internal.api`).
Every request body is parsed into a frozen dataclass by its ``from_json``, which trusts nothing:
a peer is authorized, not trusted, so a missing field, a wrong type, an integer out of range or an
id that is not a canonical UUID is refused with :class:`InvalidArgument` (HTTP 400) before any
engine code sees it. No path is ever built from a peer's text: VM ids are UUIDs, names are
checked by the engine, and a replica never takes a file path from a peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from vmreplica._internal.transport.answers import MAX_HASH_BLOCKS
from vmreplica._internal.transport.fields import HEX64, Body, parse_definition, parse_port
from vmreplica._internal.transport.media import MediaManifest
from vmreplica.errors import InvalidArgument

PREFIX = "/replication/v1"
HELLO = f"{PREFIX}/hello"
ENABLE = f"{PREFIX}/enable"
STATUS = f"{PREFIX}/status"
INITIAL_OPEN = f"{PREFIX}/initial-open"
INITIAL_CLOSE = f"{PREFIX}/initial-close"
VM_STATE = f"{PREFIX}/vm-state"
REVERSE = f"{PREFIX}/reverse"
DELTA = f"{PREFIX}/delta"  # streamed body; ?vm_id=
BOOT_FILE = f"{PREFIX}/boot-file"  # streamed body; ?vm_id=&kind=
RESYNC_START = f"{PREFIX}/resync-start"
RESYNC_HASHES = f"{PREFIX}/resync-hashes"
RESYNC_FINISH = f"{PREFIX}/resync-finish"
RESYNC_CANCEL = f"{PREFIX}/resync-cancel"
INITIAL_OFFLINE = f"{PREFIX}/initial-offline"
NEGOTIATE = f"{PREFIX}/negotiate"  # Kerberos listener only: the SPNEGO exchange of one call


def psk_label(vm_id: str) -> str:
    """What the NBD key of a VM's initial copy over Kerberos is derived for."""
    return f"initial-copy {vm_id}"


def psk_username(vm_id: str) -> str:
    return f"vmr-{vm_id[:12]}"


MAX_DISKS = 64
MAX_DISK_SIZE = 1 << 50  # 1 PiB: qcow2's own limit is lower
MAX_NAME = 100
MAX_TEXT = 4096
MAX_BOOT_FILE = 512 << 20
MAX_HASH_BLOCK_SIZE = 32 << 20
INT64 = 1 << 63
BOOT_KINDS = ("kernel", "initrd")


@dataclasses.dataclass(frozen=True)
class SettingsBody:
    """Per-VM settings as they travel; the engine checks them with the management API's rules."""

    frequency_sec: int
    recovery_history: int
    snapshot_frequency_hour: int | None
    compression: bool
    auto_resynchronize: bool
    recovery_point_interval: int
    auto_resync_start: str = "18:30"
    auto_resync_end: str = "06:00"
    encrypt: bool = False
    max_bandwidth: int = 0
    bandwidth_schedule: str | None = None

    @classmethod
    def parse(cls, body: Body) -> Self:
        return cls(
            frequency_sec=body.integer("frequency_sec", 1, 86400),
            recovery_history=body.integer("recovery_history", 0, 24),
            snapshot_frequency_hour=body.opt_integer("snapshot_frequency_hour", 1, 12),
            compression=body.boolean("compression"),
            auto_resynchronize=body.boolean("auto_resynchronize"),
            recovery_point_interval=body.integer("recovery_point_interval", 1, 86400),
            auto_resync_start=body.opt_string("auto_resync_start", 5) or "18:30",
            auto_resync_end=body.opt_string("auto_resync_end", 5) or "06:00",
            encrypt=body.boolean("encrypt", False),
            max_bandwidth=body.opt_integer("max_bandwidth", 0, 10**13) or 0,
            bandwidth_schedule=body.opt_string("bandwidth_schedule", 1000),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BootFileInfo:
    """A kernel or initrd the primary boots its VM with: the replica copies it, by hash."""

    size: int
    blake3: str

    @classmethod
    def parse(cls, body: Body | None) -> Self | None:
        if body is None:
            return None
        digest = body.string("blake3", 64)
        if not HEX64.fullmatch(digest):
            raise InvalidArgument("boot file hash must be 64 lower-case hex digits")
        return cls(size=body.integer("size", 1, MAX_BOOT_FILE), blake3=digest)


@dataclasses.dataclass(frozen=True)
class EnableRequest:
    vm_id: str
    vm_name: str
    cpus: int
    memory_mb: int
    disk_sizes: tuple[int, ...]
    settings: SettingsBody
    replica_port: int
    primary_port: int | None
    append: str | None
    kernel: BootFileInfo | None
    initrd: BootFileInfo | None
    definition: str | None = None  # a libvirt primary's domain XML (none from QEMU's runtime)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "enable")
        settings = b.sub("settings")
        assert settings is not None
        primary_port = b.raw("primary_port")
        return cls(
            vm_id=b.vm_id(),
            vm_name=b.string("vm_name", MAX_NAME),
            cpus=b.integer("cpus", 1, 64),
            memory_mb=b.integer("memory_mb", 16, 1 << 30),
            disk_sizes=b.int_list("disk_sizes", 1, MAX_DISK_SIZE, MAX_DISKS),
            settings=SettingsBody.parse(settings),
            replica_port=parse_port(b.raw("replica_port"), "enable: field 'replica_port'"),
            primary_port=None
            if primary_port is None
            else parse_port(primary_port, "enable: field 'primary_port'"),
            append=b.opt_string("append"),
            kernel=BootFileInfo.parse(b.sub("kernel", optional=True)),
            initrd=BootFileInfo.parse(b.sub("initrd", optional=True)),
            definition=parse_definition(b.raw("definition")),
        )

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.definition is None:
            del out["definition"]  # what a replica of an earlier version expects
        return out


@dataclasses.dataclass(frozen=True)
class StatusRequest:
    vm_id: str
    settings: SettingsBody | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "status")
        settings = b.sub("settings", optional=True)
        return cls(
            vm_id=b.vm_id(), settings=None if settings is None else SettingsBody.parse(settings)
        )

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id} | (
            {"settings": self.settings.to_json()} if self.settings else {}
        )


@dataclasses.dataclass(frozen=True)
class VmRequest:
    """A request that names a VM and nothing else (vm-state)."""

    vm_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(vm_id=Body(data, "request").vm_id())

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id}


@dataclasses.dataclass(frozen=True)
class InitialOpenRequest:
    vm_id: str
    required_bytes: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "initial-open")
        return cls(vm_id=b.vm_id(), required_bytes=b.opt_integer("required_bytes") or 0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class InitialCloseRequest:
    vm_id: str
    ok: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "initial-close")
        return cls(vm_id=b.vm_id(), ok=b.boolean("ok", False))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class InitialOfflineRequest:
    """The primary wrote the initial copy to offline media: the replica queues the deltas that
    follow until the media is imported, and accepts only media with this manifest."""

    vm_id: str
    media: MediaManifest

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "initial-offline")
        media = b.raw("media")
        if not isinstance(media, dict):
            raise InvalidArgument("initial-offline: field 'media' must be an object")
        return cls(vm_id=b.vm_id(), media=MediaManifest.from_json(media))

    def to_json(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id, "media": self.media.to_json()}


@dataclasses.dataclass(frozen=True)
class ReverseRequest:
    vm_id: str
    vm_name: str
    new_primary_port: int | None
    failback_extents: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "reverse")
        port = b.raw("new_primary_port")
        return cls(
            vm_id=b.vm_id(),
            vm_name=b.string("vm_name", MAX_NAME),
            new_primary_port=None
            if port is None
            else parse_port(port, "reverse: field 'new_primary_port'"),
            failback_extents=b.boolean("failback_extents", False),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ResyncStartRequest:
    """resync-start. ``from_empty``: an initial replication sent as compressed deltas
    (``start-initial --compressed``), compared against the replica's empty chain."""

    vm_id: str
    from_empty: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "resync-start")
        return cls(vm_id=b.vm_id(), from_empty=b.boolean("from_empty", False))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HashesRequest:
    """Hashes of ``count`` blocks of ``block_size`` of replicated disk ``disk``, from
    ``first_block`` (a resynchronization's block compare)."""

    vm_id: str
    disk: int
    block_size: int
    first_block: int
    count: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "resync-hashes")
        block_size = b.integer("block_size", 512, MAX_HASH_BLOCK_SIZE)
        if block_size % 512:
            raise InvalidArgument("resync-hashes: field 'block_size' must be a multiple of 512")
        return cls(
            vm_id=b.vm_id(),
            disk=b.integer("disk", 0, MAX_DISKS - 1),
            block_size=block_size,
            first_block=b.integer("first_block"),
            count=b.integer("count", 1, MAX_HASH_BLOCKS),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_boot_kind(value: object) -> str:
    if value not in BOOT_KINDS:
        raise InvalidArgument("boot file kind must be kernel or initrd")
    return str(value)
