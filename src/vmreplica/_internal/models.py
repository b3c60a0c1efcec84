"""The objects the management API returns, shared by the engine (which makes them) and the SDK
(which rebuilds them from JSON). Field names are the CLI's JSON contract (DESIGN.md section 5):
extend them, never rename them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


@dataclasses.dataclass(frozen=True)
class Model:
    """A JSON object of the API. ``table_fields`` are the columns a table shows by default."""

    table_fields: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class ServerSettings(Model):
    computer_name: str
    replication_enabled: bool
    allowed_authentication_type: str | None
    kerberos_authentication_port: int
    certificate_authentication_port: int
    replication_allowed_from_any_server: bool
    default_storage_location: str | None
    monitoring_interval: int
    monitoring_start_time: str
    certificate_thumbprint: str | None
    # Extensions: the cap on what this host sends, in bits per second (0: none), and its
    # schedule (bandwidth.py).
    max_bandwidth_bps: int = 0
    bandwidth_schedule: str | None = None

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "replication_enabled",
        "allowed_authentication_type",
        "certificate_authentication_port",
        "replication_allowed_from_any_server",
        "default_storage_location",
    )


@dataclasses.dataclass(frozen=True)
class AuthEntry(Model):
    computer_name: str
    allowed_primary_server: str
    replica_storage_location: str
    trust_group: str

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "allowed_primary_server",
        "replica_storage_location",
        "trust_group",
    )


@dataclasses.dataclass(frozen=True)
class Vm(Model):
    computer_name: str
    name: str
    id: str
    state: str
    cpus: int
    memory_mb: int
    disks: list[str]
    replication_state: str
    replication_health: str | None
    replication_mode: str | None

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "name",
        "state",
        "cpus",
        "memory_mb",
        "replication_state",
        "replication_health",
        "replication_mode",
    )


@dataclasses.dataclass(frozen=True)
class VmMove(Model):
    """What `vm move` did: the VM, the nodes, its state on the target, how long it took."""

    name: str
    id: str
    source: str
    target: str
    state: str
    handover_seconds: float
    seconds: float

    table_fields: ClassVar[tuple[str, ...]] = ("name", "source", "target", "state", "seconds")


@dataclasses.dataclass(frozen=True)
class Event(Model):
    computer_name: str
    id: int
    time: str
    level: str
    kind: str
    vm_name: str | None
    message: str

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "time",
        "level",
        "vm_name",
        "message",
    )


@dataclasses.dataclass(frozen=True)
class ConnectionTest(Model):
    """Outcome of ``replication test-connection``: each stage and, on refusal, why."""

    computer_name: str
    replica_server: str
    replica_port: int
    authentication_type: str
    reachable: bool
    tls_ok: bool
    authorized: bool
    authorization_entry: str | None
    trust_group: str | None
    reason: str | None
    # Kerberos tests only: the SPNEGO exchange completed, with mutual authentication.
    kerberos_ok: bool | None = None

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "replica_server",
        "replica_port",
        "authentication_type",
        "reachable",
        "tls_ok",
        "kerberos_ok",
        "authorized",
        "authorization_entry",
        "trust_group",
        "reason",
    )


@dataclasses.dataclass(frozen=True)
class Replication(Model):
    computer_name: str
    vm_name: str
    vm_id: str
    state: str
    health: str | None
    mode: str
    relationship_type: str
    primary_server: str
    replica_server: str
    replica_port: int
    authentication_type: str
    frequency_sec: int
    recovery_history: int
    snapshot_frequency_hour: int | None
    compression_enabled: bool
    replicated_disks: list[str]
    auto_resynchronize_enabled: bool
    trust_group: str | None
    last_replication_time: str | None
    # Extensions: progress of initial replication, the advanced recovery-point interval.
    initial_replication_progress: float | None = None
    recovery_point_interval_sec: int = 3600
    resynchronization_progress: float | None = None
    max_bandwidth_bps: int = 0
    bandwidth_schedule: str | None = None
    # How replication traffic is protected: "tls" (certificates), "gss-wrap" (Kerberos, bodies
    # encrypted and integrity-protected) or "gss-mic" (Kerberos, integrity-protected only).
    wire_protection: str = "tls"

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "vm_name",
        "state",
        "health",
        "mode",
        "primary_server",
        "replica_server",
        "frequency_sec",
        "last_replication_time",
    )


@dataclasses.dataclass(frozen=True)
class Measurement(Model):
    computer_name: str
    vm_name: str
    state: str
    health: str | None
    health_details: list[str]
    last_replication_time: str | None
    last_replication_size: int | None
    pending_replication_size: int
    average_replication_size: int | None
    maximum_replication_size: int | None
    average_replication_latency: float | None
    maximum_replication_latency: float | None
    successful_replication_count: int
    missed_replication_count: int
    replication_errors: int
    initial_replication_size: int | None
    monitoring_start_time: str
    monitoring_end_time: str
    # Extension: how far a resynchronization got, in percent of the blocks compared.
    resynchronization_progress: float | None = None

    table_fields: ClassVar[tuple[str, ...]] = (
        "computer_name",
        "vm_name",
        "state",
        "health",
        "last_replication_time",
        "pending_replication_size",
        "average_replication_size",
        "successful_replication_count",
        "missed_replication_count",
        "replication_errors",
    )


@dataclasses.dataclass(frozen=True)
class RecoveryPoint(Model):
    id: str
    vm_name: str
    creation_time: str
    kind: str
    size: int

    table_fields: ClassVar[tuple[str, ...]] = ("id", "vm_name", "creation_time", "kind", "size")


@dataclasses.dataclass(frozen=True)
class ClusterInfo(Model):
    """`cluster get`: a cluster of hosts on etcd (docs/CLUSTER.md)."""

    name: str
    etcd_endpoints: list[str]
    broker: str | None
    nodes: int
    healthy_nodes: int
    vms: int
    created: str | None = None

    table_fields: ClassVar[tuple[str, ...]] = ("name", "broker", "nodes", "healthy_nodes", "vms")


@dataclasses.dataclass(frozen=True)
class ClusterNode(Model):
    """`cluster node list`: a node, its health (its etcd lease) and the VMs it owns."""

    name: str
    address: str
    healthy: bool
    lease_remaining: int
    owned_vms: list[str]

    table_fields: ClassVar[tuple[str, ...]] = ("name", "address", "healthy", "owned_vms")
