"""Replication server settings and authorization entries (Get/Set-VMReplicationServer,
*-VMReplicationAuthorizationEntry), with Hyper-V's defaults and rules.

The service owns validation and persistence. Opening and closing the certificate listener is
the agent's job: it passes a :class:`ListenerControl` that is told the new settings after every
change, and a change whose listener cannot be opened (port taken, bad certificate) is rolled back.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Protocol

from vmreplica._internal.certs import cert_thumbprint
from vmreplica._internal.config import HostConfig
from vmreplica._internal.engine import validate
from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.models import AuthEntry, ServerSettings
from vmreplica._internal.store.db import Database, put_setting
from vmreplica.errors import (
    AccessDenied,
    InvalidArgument,
    InvalidState,
    NotFound,
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


@dataclasses.dataclass(frozen=True)
class ListenerFiles:
    ca: Path
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Authorization:
    """Who a peer is to this replica server: the entry that admits it and its trust group."""

    entry: str
    trust_group: str
    storage_location: Path


class ListenerControl(Protocol):
    async def apply(self, settings: ServerSettings, files: ListenerFiles) -> None: ...


class ServerService:
    def __init__(self, db: Database, events: EventLog, config: HostConfig) -> None:
        self._db = db
        self._events = events
        self._config = config
        self.listener: ListenerControl | None = None

    def _raw(self) -> dict[str, object]:
        return {k: self._db.get_setting(f"server.{k}", v) for k, v in _DEFAULTS.items()}

    def listener_files(self) -> ListenerFiles:
        raw = self._raw()
        tls = self._config.tls
        return ListenerFiles(
            ca=Path(str(raw["listener_ca"])) if raw["listener_ca"] else tls.ca,
            cert=Path(str(raw["listener_certificate"]))
            if raw["listener_certificate"]
            else tls.cert,
            key=Path(str(raw["listener_key"])) if raw["listener_key"] else tls.key,
        )

    def get(self) -> ServerSettings:
        raw = self._raw()
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
        )

    async def set(self, changes: ServerChanges) -> ServerSettings:
        old = self._raw()
        new = dict(old)
        if changes.auth is not None:
            auth = changes.auth.lower()
            if auth not in AUTH_TYPES:
                raise InvalidArgument(
                    f"invalid authentication type {changes.auth!r}: use kerberos, certificate or both"
                )
            if auth != "certificate":
                raise InvalidArgument(
                    f"{auth} authentication is not available in this version of vmreplica: "
                    "use --auth certificate"
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
            new["default_storage_location"] = str(
                validate.storage_location(changes.storage_location)
            )
        if changes.any_server is not None:
            new["replication_allowed_from_any_server"] = changes.any_server
        if changes.monitoring_interval is not None:
            new["monitoring_interval"] = validate.monitoring_interval(changes.monitoring_interval)
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
        if new["replication_allowed_from_any_server"] and new["default_storage_location"]:
            self._ensure_location(Path(str(new["default_storage_location"])))

        with self._db.tx() as conn:
            for key, value in new.items():
                if value != old[key]:
                    put_setting(conn, f"server.{key}", value)
        if self.listener is not None:
            try:
                await self.listener.apply(self.get(), self.listener_files())
            except VmrError:
                with self._db.tx() as conn:
                    for key, value in old.items():
                        put_setting(conn, f"server.{key}", value)
                raise
        changed = sorted(k for k in new if new[k] != old[k])
        if changed:
            self._events.record(
                "server-settings-changed",
                "replication server settings changed: " + ", ".join(changed),
            )
        return self.get()

    # -- authorization entries --------------------------------------------------------------

    def _entry(self, row: sqlite3.Row) -> AuthEntry:
        return AuthEntry(
            computer_name=self._config.name,
            allowed_primary_server=row["allowed_primary"],
            replica_storage_location=row["storage_location"],
            trust_group=row["trust_group"],
        )

    def auth_list(
        self, allowed_primary: str | None = None, trust_group: str | None = None
    ) -> list[AuthEntry]:
        entries = [
            self._entry(r)
            for r in self._db.query("SELECT * FROM auth_entries ORDER BY allowed_primary")
        ]
        if allowed_primary is not None:
            wanted = allowed_primary.lower()
            entries = [e for e in entries if e.allowed_primary_server == wanted]
        if trust_group is not None:
            entries = [e for e in entries if e.trust_group == trust_group]
        return entries

    def _ensure_location(self, path: Path) -> None:
        if path.is_dir():
            warn_if_shared(self._events, path)
            return
        if path.exists():
            raise InvalidArgument(f"storage location {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise StorageError(f"cannot create storage location {path}: {e.strerror or e}") from e
        self._events.record("storage-location-created", f"created storage location {path}")

    def auth_new(self, allowed_primary: str, storage_location: str, trust_group: str) -> AuthEntry:
        if self._raw()["replication_allowed_from_any_server"]:
            raise InvalidState(
                "authorization entries apply only when replication is restricted to specific "
                "servers: run `server set --any-server false` first"
            )
        pattern = validate.primary_server_pattern(allowed_primary)
        location = validate.storage_location(storage_location)
        group = validate.trust_group(trust_group)
        if self.auth_list(pattern):
            raise InvalidState(
                f"an authorization entry for {pattern} already exists: use `auth set`"
            )
        self._ensure_location(location)
        with self._db.tx() as conn:
            conn.execute(
                "INSERT INTO auth_entries(allowed_primary, storage_location, trust_group) VALUES(?,?,?)",
                (pattern, str(location), group),
            )
            self._events.record(
                "auth-entry-added",
                f"authorized {pattern} (trust group {group}, storage {location})",
                conn=conn,
            )
        return self.auth_list(pattern)[0]

    def auth_set(
        self,
        allowed_primary: str,
        storage_location: str | None = None,
        trust_group: str | None = None,
    ) -> AuthEntry:
        pattern = validate.primary_server_pattern(allowed_primary)
        if not self.auth_list(pattern):
            raise NotFound(f"no authorization entry for {pattern}")
        location = (
            validate.storage_location(storage_location) if storage_location is not None else None
        )
        group = validate.trust_group(trust_group) if trust_group is not None else None
        if location is not None:
            self._ensure_location(location)
        with self._db.tx() as conn:
            if location is not None:
                conn.execute(
                    "UPDATE auth_entries SET storage_location=? WHERE allowed_primary=?",
                    (str(location), pattern),
                )
            if group is not None:
                conn.execute(
                    "UPDATE auth_entries SET trust_group=? WHERE allowed_primary=?",
                    (group, pattern),
                )
            self._events.record(
                "auth-entry-changed", f"changed authorization entry {pattern}", conn=conn
            )
        return self.auth_list(pattern)[0]

    def auth_remove(
        self, allowed_primary: str | None = None, trust_group: str | None = None
    ) -> list[AuthEntry]:
        if (allowed_primary is None) == (trust_group is None):
            raise InvalidArgument("give exactly one of --allowed-primary or --trust-group")
        if allowed_primary is not None:
            victims = self.auth_list(validate.primary_server_pattern(allowed_primary))
        else:
            victims = self.auth_list(trust_group=trust_group)
        if not victims:
            raise NotFound(
                f"no authorization entry matches {allowed_primary or 'trust group ' + str(trust_group)}"
            )
        with self._db.tx() as conn:
            for entry in victims:
                conn.execute(
                    "DELETE FROM auth_entries WHERE allowed_primary=?",
                    (entry.allowed_primary_server,),
                )
                self._events.record(
                    "auth-entry-removed",
                    f"removed authorization entry {entry.allowed_primary_server}",
                    conn=conn,
                )
        return victims

    def authorize(self, peer_names: list[str]) -> Authorization:
        """The entry that lets a peer replicate here, by the DNS names of its certificate."""
        raw = self._raw()
        if not raw["replication_enabled"]:
            raise InvalidState("replication disabled: this server does not accept replication")
        entries = self.auth_list()
        names = [n.lower() for n in peer_names]
        # An exact entry wins over a wildcard, so an admin can single out one host of a domain.
        for exact in (True, False):
            for entry in entries:
                if entry.allowed_primary_server.startswith("*.") == exact:
                    continue
                if any(validate.pattern_matches(entry.allowed_primary_server, n) for n in names):
                    return Authorization(
                        entry.allowed_primary_server,
                        entry.trust_group,
                        Path(entry.replica_storage_location),
                    )
        if raw["replication_allowed_from_any_server"] and raw["default_storage_location"]:
            return Authorization(
                "*", DEFAULT_TRUST_GROUP, Path(str(raw["default_storage_location"]))
            )
        err = AccessDenied(
            f"not authorized: no authorization entry on this replica server allows {', '.join(names) or 'this peer'}"
        )
        self._events.record(
            "peer-refused",
            f"refused {', '.join(names) or 'a peer'}: {err.message}",
            level="warning",
        )
        raise err


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
