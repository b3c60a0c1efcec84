"""Authorization entries (*-VMReplicationAuthorizationEntry) and who a peer is to this host.

An entry allows a primary server (an FQDN, or ``*.`` and a domain: Hyper-V's only wildcard),
gives its replicas a storage location and a trust group. A peer is authorized by the DNS names
of its certificate; an exact entry wins over a wildcard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vmreplica._internal import validate
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.server_settings import (
    DEFAULT_TRUST_GROUP,
    ServerService,
    check_location_free,
    ensure_location,
)
from vmreplica._internal.models import AuthEntry
from vmreplica._internal.store.server import AuthRow
from vmreplica.errors import AccessDenied, InvalidArgument, InvalidState, NotFound

ANY_SERVER = "*"  # the entry of a peer admitted because replication is allowed from any server


@dataclasses.dataclass(frozen=True)
class Authorization:
    """Who a peer is to this replica server: the entry that admits it and its trust group."""

    entry: str
    trust_group: str
    storage_location: Path
    # Which listener the peer came in on: what this host uses to reach it back (reverse).
    authentication_type: str = "certificate"

    @property
    def by_entry(self) -> bool:
        """Admitted by an authorization entry, not only because replication is allowed from
        any server: only then does its trust group make it a partner of others' replicas."""
        return self.entry != ANY_SERVER


class AuthorizationService:
    def __init__(self, ctx: Context, server: ServerService) -> None:
        self._ctx = ctx
        self._server = server
        self._store = ctx.stores.auth
        self._events = ctx.events
        self._config = ctx.config
        self._db = ctx.stores.db

    def _entry(self, row: AuthRow) -> AuthEntry:
        return AuthEntry(
            computer_name=self._config.name,
            allowed_primary_server=row.allowed_primary,
            replica_storage_location=row.storage_location,
            trust_group=row.trust_group,
        )

    def auth_list(
        self, allowed_primary: str | None = None, trust_group: str | None = None
    ) -> list[AuthEntry]:
        entries = [self._entry(r) for r in self._store.all()]
        if allowed_primary is not None:
            wanted = allowed_primary.lower()
            entries = [e for e in entries if e.allowed_primary_server == wanted]
        if trust_group is not None:
            entries = [e for e in entries if e.trust_group == trust_group]
        return entries

    def auth_new(self, allowed_primary: str, storage_location: str, trust_group: str) -> AuthEntry:
        if self._server.raw()["replication_allowed_from_any_server"]:
            raise InvalidState(
                "authorization entries apply only when replication is restricted to specific "
                "servers: run `server set --any-server false` first"
            )
        pattern = validate.primary_server_pattern(allowed_primary)
        location = validate.storage_location(storage_location)
        check_location_free(self._ctx, location)
        group = validate.trust_group(trust_group)
        if self.auth_list(pattern):
            raise InvalidState(
                f"an authorization entry for {pattern} already exists: use `auth set`"
            )
        ensure_location(self._events, location)
        with self._db.tx() as tx:
            self._store.insert(tx, AuthRow(pattern, str(location), group))
            self._events.record(
                "auth-entry-added",
                f"authorized {pattern} (trust group {group}, storage {location})",
                tx=tx,
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
            check_location_free(self._ctx, location)
            ensure_location(self._events, location)
        with self._db.tx() as tx:
            self._store.update(tx, pattern, None if location is None else str(location), group)
            self._events.record(
                "auth-entry-changed", f"changed authorization entry {pattern}", tx=tx
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
        with self._db.tx() as tx:
            for entry in victims:
                self._store.delete(tx, entry.allowed_primary_server)
                self._events.record(
                    "auth-entry-removed",
                    f"removed authorization entry {entry.allowed_primary_server}",
                    tx=tx,
                )
        return victims

    def entries(self) -> list[tuple[str, str, str]]:
        """(allowed primary, storage location, trust group) of every entry: what the cluster
        shares (the computer name is each node's own)."""
        return sorted(
            (e.allowed_primary_server, e.replica_storage_location, e.trust_group)
            for e in self.auth_list()
        )

    def replace_all(self, entries: list[tuple[str, str, str]]) -> None:
        """The cluster's entries, as another node published them (validated there)."""
        current = {e[0]: e for e in self.entries()}
        wanted = {e[0]: e for e in entries}
        if current == wanted:
            return
        for _, location, _ in wanted.values():
            ensure_location(self._events, Path(location))
        with self._db.tx() as tx:
            for name in current.keys() - wanted.keys():
                self._store.delete(tx, name)
            for name, (_, location, group) in wanted.items():
                if name not in current:
                    self._store.insert(tx, AuthRow(name, location, group))
                elif current[name] != wanted[name]:
                    self._store.update(tx, name, location, group)
            self._events.record(
                "auth-entries-synced",
                f"authorization entries set from the cluster: {len(wanted)} in all",
                tx=tx,
            )

    def authorize(self, peer_names: list[str]) -> Authorization:
        """The entry that lets a peer replicate here, by the DNS names of its certificate."""
        raw = self._server.raw()
        if not raw["replication_enabled"]:
            self._ctx.refusals["replication-disabled"] += 1
            raise InvalidState("replication disabled: this server does not accept replication")
        if not peer_names:  # every route keeps the name of the peer it serves
            self._ctx.refusals["no-entry"] += 1
            raise AccessDenied(
                "not authorized: the peer's certificate names no host (it has no DNS name)"
            )
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
                ANY_SERVER, DEFAULT_TRUST_GROUP, Path(str(raw["default_storage_location"]))
            )
        self._ctx.refusals["no-entry"] += 1
        err = AccessDenied(
            f"not authorized: no authorization entry on this replica server allows {', '.join(names) or 'this peer'}"
        )
        self._events.record(
            "peer-refused",
            f"refused {', '.join(names) or 'a peer'}: {err.message}",
            level="warning",
        )
        raise err
