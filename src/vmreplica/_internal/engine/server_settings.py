"""Replication server settings (Get/Set-VMReplicationServer), with Hyper-V's defaults and rules.

The service owns validation and persistence. Opening and closing the certificate listener is
the agent's job: it passes a :class:`ListenerControl` that is told the new settings after every
change, and a change whose listener cannot be opened (port taken, bad certificate) is rolled back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from vmreplica._internal import validate
from vmreplica._internal.bandwidth import Schedule, parse_rate
from vmreplica._internal.certs import cert_thumbprint
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.models import ServerSettings
from vmreplica.errors import (
    InvalidArgument,
    StorageError,
    VmrError,
)

DEFAULT_TRUST_GROUP = "DEFAULT"
AUTH_TYPES = ("kerberos", "certificate", "both")

_DEFAULTS: dict[str, object] = {
    "replication_enabled": False,
    "allowed_authentication_type": None,
    "kerberos_authentication_port": 80,
    "certificate_authentication_port": 443,
    "replication_allowed_from_any_server": False,
    "default_storage_location": None,
    "monitoring_interval": 12 * 3600,
    "monitoring_start_time": "09:00",
    "listener_certificate": None,
    "listener_key": None,
    "listener_ca": None,
    "max_bandwidth": 0,  # bits per second for all replication traffic this host sends
    "bandwidth_schedule": None,
}


@dataclasses.dataclass(frozen=True)
class ServerChanges:
    """What ``server set`` asks for; ``None`` leaves a field as it is."""

    enabled: bool | None = None
    auth: str | None = None
    kerberos_port: int | None = None
    certificate_port: int | None = None
    any_server: bool | None = None
    storage_location: str | None = None
    certificate: str | None = None
    key: str | None = None
    ca: str | None = None
    monitoring_interval: str | None = None
    monitoring_start_time: str | None = None
    max_bandwidth: str | None = None  # RATE, bits per second with SI suffixes
    bandwidth_schedule: str | None = None  # "" clears it


@dataclasses.dataclass(frozen=True)
class ListenerFiles:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None  # host.toml's, whichever certificate the listener presents


class ListenerControl(Protocol):
    async def apply(self, settings: ServerSettings, files: ListenerFiles) -> None: ...


class ServerService:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._db = ctx.stores.db
        self._settings = ctx.stores.settings
        self._events = ctx.events
        self._config = ctx.config
        self.listener: ListenerControl | None = None

    def raw(self) -> dict[str, object]:
        return {k: self._settings.get(f"server.{k}", v) for k, v in _DEFAULTS.items()}

    def listener_files(self) -> ListenerFiles:
        raw = self.raw()
        tls = self._config.tls
        return ListenerFiles(
            ca=Path(str(raw["listener_ca"])) if raw["listener_ca"] else tls.ca,
            cert=Path(str(raw["listener_certificate"]))
            if raw["listener_certificate"]
            else tls.cert,
            key=Path(str(raw["listener_key"])) if raw["listener_key"] else tls.key,
            crl=tls.crl,
        )

    def get(self) -> ServerSettings:
        raw = self.raw()
        try:
            thumbprint: str | None = cert_thumbprint(self.listener_files().cert)
        except VmrError:
            thumbprint = None
        return ServerSettings(
            computer_name=self._config.name,
            replication_enabled=bool(raw["replication_enabled"]),
            allowed_authentication_type=_opt_str(raw["allowed_authentication_type"]),
            kerberos_authentication_port=int(str(raw["kerberos_authentication_port"])),
            certificate_authentication_port=int(str(raw["certificate_authentication_port"])),
            replication_allowed_from_any_server=bool(raw["replication_allowed_from_any_server"]),
            default_storage_location=_opt_str(raw["default_storage_location"]),
            monitoring_interval=int(str(raw["monitoring_interval"])),
            monitoring_start_time=str(raw["monitoring_start_time"]),
            certificate_thumbprint=thumbprint,
            max_bandwidth_bps=int(str(raw["max_bandwidth"])),
            bandwidth_schedule=_opt_str(raw["bandwidth_schedule"]),
        )

    async def set(self, changes: ServerChanges) -> ServerSettings:
        old = self.raw()
        new = dict(old)
        if changes.auth is not None:
            auth = changes.auth.lower()
            if auth not in AUTH_TYPES:
                raise InvalidArgument(
                    f"invalid authentication type {changes.auth!r}: use kerberos, certificate or both"
                )
            new["allowed_authentication_type"] = auth
        if changes.enabled is not None:
            new["replication_enabled"] = changes.enabled
        if changes.kerberos_port is not None:
            new["kerberos_authentication_port"] = validate.port(
                changes.kerberos_port, "Kerberos port"
            )
        if changes.certificate_port is not None:
            new["certificate_authentication_port"] = validate.port(
                changes.certificate_port, "certificate port"
            )
        if changes.storage_location is not None:
            location = validate.storage_location(changes.storage_location)
            check_location_free(self._ctx, location)
            new["default_storage_location"] = str(location)
        if changes.any_server is not None:
            new["replication_allowed_from_any_server"] = changes.any_server
        if changes.monitoring_interval is not None:
            new["monitoring_interval"] = validate.monitoring_interval(changes.monitoring_interval)
        if changes.max_bandwidth is not None:
            new["max_bandwidth"] = parse_rate(changes.max_bandwidth)
        if changes.bandwidth_schedule is not None:
            text = changes.bandwidth_schedule.strip()
            new["bandwidth_schedule"] = Schedule.parse(text).text if text else None
        if changes.monitoring_start_time is not None:
            new["monitoring_start_time"] = validate.time_of_day(changes.monitoring_start_time)
        tls_given = [changes.certificate, changes.key, changes.ca]
        if any(v is not None for v in tls_given):
            if not all(tls_given):
                raise InvalidArgument("--certificate, --key and --ca must be given together")
            for flag, given in zip(("--certificate", "--key", "--ca"), tls_given, strict=True):
                path = Path(str(given))
                if not path.is_absolute() or not path.is_file():
                    raise InvalidArgument(f"{flag} {given}: not an existing file (absolute path)")
            new["listener_certificate"], new["listener_key"], new["listener_ca"] = tls_given

        if new["replication_enabled"] and new["allowed_authentication_type"] is None:
            raise InvalidArgument(
                "enabling replication needs an authentication type: add --auth certificate"
            )
        if new["replication_allowed_from_any_server"] and not new["default_storage_location"]:
            raise InvalidArgument(
                "replication from any server requires a default storage location: add --storage-location PATH"
            )
        return await self._store(old, new)

    async def apply_values(self, values: dict[str, object]) -> ServerSettings:
        """Settings another node of the cluster published (already validated there)."""
        old = self.raw()
        new = old | {k: v for k, v in values.items() if k in _DEFAULTS}
        return await self._store(old, new)

    async def _store(self, old: dict[str, object], new: dict[str, object]) -> ServerSettings:
        if new["replication_allowed_from_any_server"] and new["default_storage_location"]:
            ensure_location(self._events, Path(str(new["default_storage_location"])))

        with self._db.tx() as tx:
            for key, value in new.items():
                if value != old[key]:
                    self._settings.put(tx, f"server.{key}", value)
        if self.listener is not None:
            try:
                await self.listener.apply(self.get(), self.listener_files())
            except VmrError:
                with self._db.tx() as tx:
                    for key, value in old.items():
                        self._settings.put(tx, f"server.{key}", value)
                raise
        changed = sorted(k for k in new if new[k] != old[k])
        if changed:
            self._events.record(
                "server-settings-changed",
                "replication server settings changed: " + ", ".join(changed),
            )
        return self.get()


AGENT_DIRS = ("vms", "run", "replication")  # the agent's own, in its state directory


def check_location_free(ctx: Context, path: Path) -> None:
    """A storage location is no place where the agent keeps something already: its state
    directory itself or one of its own directories there (a replica VM named ``run`` or ``vms``
    would be stored in it), or the storage of a replica VM (whose `vm remove --delete-storage`
    would take the other replicas with it). A directory of its own in the state directory is
    fine (``/var/lib/vmreplica/replicas``)."""
    real = path.resolve()
    state = ctx.config.state_dir.resolve()
    owned = [state / d for d in AGENT_DIRS]
    if real == state or any(real == d or d in real.parents for d in owned):
        raise InvalidArgument(
            f"invalid storage location {path}: it is the agent's state directory {state} or one "
            f"of its own directories there ({', '.join(AGENT_DIRS)}); use a directory of its own"
        )
    for row in ctx.stores.replications.all():
        place = Path(row.storage_dir).resolve() if row.storage_dir else None
        if place is not None and (real == place or place in real.parents):
            raise InvalidArgument(
                f"invalid storage location {path}: it is in the storage of replica VM "
                f"{row.vm_name} ({place})"
            )


def ensure_location(events: EventLog, path: Path) -> None:
    """A storage location exists as a directory afterwards (made private when it is made)."""
    if path.is_dir():
        warn_if_shared(events, path)
        return
    if path.exists():
        raise InvalidArgument(f"storage location {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, mode=0o700)
    except OSError as e:
        raise StorageError(f"cannot create storage location {path}: {e.strerror or e}") from e
    events.record("storage-location-created", f"created storage location {path}")


def warn_if_shared(events: EventLog, location: Path) -> None:
    """Images are made 0600 in 0700 directories whatever the parent; a location that others can
    list still shows them which VMs it holds, so the operator is told."""
    try:
        mode = location.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        events.record(
            "storage-location-shared",
            f"storage location {location} has mode {mode:04o}: other users can list it; "
            f"`chmod 700 {location}` keeps the names of replica VMs private",
            level="warning",
        )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
