"""Every call of the management API, described once, for both SDK front ends
(:mod:`vmreplica.client`): what to send and how to decode the answer. Private: the public
surface is ``Client`` and ``AsyncClient``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeVar, overload

from vmreplica._internal.config import RemoteHost, load_remote_host
from vmreplica._internal.models import (
    AuthEntry,
    ConnectionTest,
    Event,
    Measurement,
    Model,
    RecoveryPoint,
    Replication,
    ServerSettings,
    Vm,
    VmMove,
)
from vmreplica._internal.sdk import Transport

if TYPE_CHECKING:
    from vmreplica.client import AsyncClient, Client

M = TypeVar("M", bound=Model)
P = ParamSpec("P")
T = TypeVar("T")


# -- the calls -------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what to send, and how to turn the ``result`` into the return value."""

    method: str
    args: dict[str, Any]
    decode: Callable[[Any], T]


def model(cls: type[M], method: str, args: dict[str, Any] | None = None) -> Call[M]:
    return Call(method, args or {}, cls.from_json)


def models(cls: type[M], method: str, args: dict[str, Any] | None = None) -> Call[list[M]]:
    return Call(method, args or {}, lambda result: [cls.from_json(item) for item in result])


class Endpoint(Generic[P, T]):
    """A method of both clients, from a function that describes its call: on a
    :class:`Client` it returns the result, on an :class:`AsyncClient` it is a coroutine.
    Typed per front end, so each method keeps its signature for mypy and IDEs."""

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(
        self, obj: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    @overload
    def __get__(self, obj: Client, owner: type[Any]) -> Callable[P, T]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        return self if obj is None else obj._bind(self._build)


class Api:
    """What both clients share: where requests go, and every method of the API.

    A method here is an :class:`Endpoint` over a function without ``self``: it only describes
    the call, and each front end's ``_bind`` makes it blocking or a coroutine.
    """

    def __init__(
        self,
        socket: Path | None = None,
        remote: RemoteHost | None = None,
        timeout: float | None = None,
    ) -> None:
        self._transport = Transport(socket, remote, timeout)

    @classmethod
    def connect(cls, computer_name: str | None = None) -> Self:
        """The local agent when ``computer_name`` is None, else the host the CLI config names."""
        if computer_name is None:
            return cls()
        return cls(remote=load_remote_host(computer_name))

    @property
    def target(self) -> str:
        return self._transport.target

    # -- host, server and authorization ----------------------------------------------------

    @Endpoint
    def computer_name() -> Call[str]:
        return Call("host.info", {}, lambda result: str(result["computer_name"]))

    @Endpoint
    def server_get() -> Call[ServerSettings]:
        return model(ServerSettings, "server.get")

    @Endpoint
    def server_set(**changes: Any) -> Call[ServerSettings]:
        """Keyword names as in ServerChanges: enabled, auth, certificate_port, any_server, …"""
        return model(ServerSettings, "server.set", changes)

    @Endpoint
    def auth_new(allowed_primary: str, storage_location: str, trust_group: str) -> Call[AuthEntry]:
        return model(
            AuthEntry,
            "auth.new",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    @Endpoint
    def auth_get(
        allowed_primary: str | None = None, trust_group: str | None = None
    ) -> Call[list[AuthEntry]]:
        return models(
            AuthEntry, "auth.get", {"allowed_primary": allowed_primary, "trust_group": trust_group}
        )

    @Endpoint
    def auth_set(
        allowed_primary: str,
        storage_location: str | None = None,
        trust_group: str | None = None,
    ) -> Call[AuthEntry]:
        return model(
            AuthEntry,
            "auth.set",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    @Endpoint
    def auth_remove(
        allowed_primary: str | None = None, trust_group: str | None = None
    ) -> Call[list[AuthEntry]]:
        return models(
            AuthEntry,
            "auth.remove",
            {"allowed_primary": allowed_primary, "trust_group": trust_group},
        )

    @Endpoint
    def test_connection(
        replica_server: str, replica_port: int, auth: str = "certificate"
    ) -> Call[ConnectionTest]:
        return model(
            ConnectionTest,
            "replication.test_connection",
            {
                "replica_server": replica_server,
                "replica_port": replica_port,
                "auth": auth,
            },
        )

    # -- VMs --------------------------------------------------------------------------------

    @Endpoint
    def vm_new(
        name: str,
        memory: str | None = None,
        cpus: int | None = None,
        disks: list[dict[str, str]] | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
    ) -> Call[Vm]:
        """``disks``: a list of ``{"size": "1G"}``, ``{"path": P}`` or ``{"parent": P}``."""
        return model(
            Vm,
            "vm.new",
            {
                "name": name,
                "memory": memory,
                "cpus": cpus,
                "disks": disks or [],
                "kernel": kernel,
                "initrd": initrd,
                "append": append,
            },
        )

    @Endpoint
    def vm_list() -> Call[list[Vm]]:
        return models(Vm, "vm.list")

    @Endpoint
    def vm_get(name: str) -> Call[Vm]:
        return model(Vm, "vm.get", {"name": name})

    @Endpoint
    def vm_start(name: str) -> Call[Vm]:
        return model(Vm, "vm.start", {"name": name})

    @Endpoint
    def vm_stop(name: str, force: bool = False, timeout: float | None = None) -> Call[Vm]:
        return model(Vm, "vm.stop", {"name": name, "force": force, "timeout": timeout})

    @Endpoint
    def vm_move(
        name: str, to: str, force: bool = False, timeout: float | None = None
    ) -> Call[VmMove]:
        return model(
            VmMove, "vm.move", {"name": name, "to": to, "force": force, "timeout": timeout}
        )

    @Endpoint
    def vm_remove(name: str, force: bool = False, delete_storage: bool = False) -> Call[Vm]:
        return model(
            Vm, "vm.remove", {"name": name, "force": force, "delete_storage": delete_storage}
        )

    @Endpoint
    def vm_monitor(name: str, command: str) -> Call[str]:
        return Call(
            "vm.monitor",
            {"name": name, "command": command},
            lambda result: str(result["output"]),
        )

    @Endpoint
    def event_list(since: str | None = None) -> Call[list[Event]]:
        return models(Event, "event.list", {"since": since})

    # -- replication ------------------------------------------------------------------------

    @Endpoint
    def replication_enable(
        vm: str,
        replica_server: str,
        replica_port: int,
        auth: str = "certificate",
        **settings: Any,
    ) -> Call[Replication]:
        """``settings``: frequency, recovery_history, snapshot_frequency, compression,
        exclude_disks, auto_resynchronize, recovery_point_interval."""
        return model(Replication, "replication.enable", {
            "vm": vm, "replica_server": replica_server, "replica_port": replica_port, "auth": auth, **settings,
        })  # fmt: skip

    @Endpoint
    def replication_set(vm: str, **settings: Any) -> Call[Replication]:
        return model(Replication, "replication.set", {"vm": vm, **settings})

    @Endpoint
    def replication_get(
        vm: str | None = None,
        state: str | None = None,
        health: str | None = None,
        mode: str | None = None,
    ) -> Call[list[Replication]]:
        return models(
            Replication,
            "replication.get",
            {"vm": vm, "state": state, "health": health, "mode": mode},
        )

    @Endpoint
    def replication_measure(vm: str | None = None) -> Call[list[Measurement]]:
        return models(Measurement, "replication.measure", {"vm": vm})

    @Endpoint
    def replication_enable_as_replica(
        vm: str, allowed_primary: str | None = None
    ) -> Call[Replication]:
        """On the replica host: the VM ``vm`` of this host is the copy its replica starts from
        (``replication enable VM --as-replica``)."""
        return model(Replication, "replication.enable", {
            "vm": vm, "as_replica": True, "allowed_primary": allowed_primary,
        })  # fmt: skip

    @Endpoint
    def replication_start_initial(
        vm: str,
        use_backup: bool = False,
        destination: str | None = None,
        start_time: str | None = None,
        compressed: bool = False,
    ) -> Call[Replication]:
        """Over the network; from the copy on the replica (``use_backup``); or to offline media
        in ``destination``; now or at ``start_time`` (ISO 8601, at most 7 days ahead).
        ``compressed``: over the network as compressed deltas that resume after a cut, for slow
        links, instead of one NBD copy."""
        args: dict[str, Any] = {
            "vm": vm, "use_backup": use_backup, "destination": destination,
            "start_time": start_time,
        }  # fmt: skip
        if compressed:  # sent only when set: an older agent refuses no field it never sees
            args["compressed"] = True
        return model(Replication, "replication.start_initial", args)

    @Endpoint
    def replication_stop_initial(vm: str) -> Call[Replication]:
        """Stop an initial replication of any kind, running or scheduled."""
        return model(Replication, "replication.stop_initial", {"vm": vm})

    @Endpoint
    def replication_import_initial(vm: str, path: str) -> Call[Replication]:
        """On the replica host: import the offline media in ``path`` (a directory)."""
        return model(Replication, "replication.import_initial", {"vm": vm, "path": path})

    @Endpoint
    def replication_sync(vm: str) -> Call[Replication]:
        return model(Replication, "replication.sync", {"vm": vm})

    @Endpoint
    def replication_suspend(vm: str) -> Call[Replication]:
        return model(Replication, "replication.suspend", {"vm": vm})

    @Endpoint
    def replication_resume(
        vm: str,
        resynchronize: bool = False,
        start_time: str | None = None,
        continue_: bool = False,
    ) -> Call[Replication]:
        """``continue_`` is ``--continue``: a suspended resynchronization goes on."""
        return model(Replication, "replication.resume", {
            "vm": vm, "resynchronize": resynchronize, "start_time": start_time,
            "continue": continue_,
        })  # fmt: skip

    @Endpoint
    def replication_stop(vm: str) -> Call[Replication]:
        """Stop a resynchronization; the replica stays as it was before it."""
        return model(Replication, "replication.stop", {"vm": vm})

    @Endpoint
    def replication_remove(vm: str) -> Call[Replication]:
        return model(Replication, "replication.remove", {"vm": vm})

    @Endpoint
    def replication_reset_statistics(vm: str) -> Call[Replication]:
        return model(Replication, "replication.reset_statistics", {"vm": vm})

    @Endpoint
    def failover_start(
        vm: str,
        prepare: bool = False,
        as_test: bool = False,
        recovery_point: str | None = None,
        force: bool = False,
    ) -> Call[Replication]:
        return model(Replication, "failover.start", {
            "vm": vm, "prepare": prepare, "as_test": as_test, "recovery_point": recovery_point, "force": force,
        })  # fmt: skip

    @Endpoint
    def failover_stop(vm: str) -> Call[Replication]:
        return model(Replication, "failover.stop", {"vm": vm})

    @Endpoint
    def failover_complete(vm: str) -> Call[Replication]:
        return model(Replication, "failover.complete", {"vm": vm})

    @Endpoint
    def recovery_point_list(vm: str) -> Call[list[RecoveryPoint]]:
        return models(RecoveryPoint, "recovery_point.list", {"vm": vm})
