"""The vmreplica Python SDK: typed calls to a host agent's management API.

The CLI is built on this module and nothing else, so whatever the CLI does a script can do::

    from vmreplica.client import Client

    host = Client.connect("vmhost2")          # a name from the CLI config, or None for local
    for vm in host.vm_list():
        print(vm.name, vm.state)

Async code uses :class:`AsyncClient`, which has the same methods as coroutines::

    from vmreplica.client import AsyncClient

    host = AsyncClient.connect("vmhost2")
    for vm in await host.vm_list():
        print(vm.name, vm.state)

Each call is a single HTTP request over the local unix socket (``$VMREPLICA_SOCKET``) or over
HTTPS with the administrator's client certificate; nothing stays open between calls, so there is
nothing to close. :class:`Client` blocks until the answer comes, also when called where an event
loop is running: the request then runs on a private loop in a worker thread and the caller's loop
is left alone (though it stalls while this thread waits: async code should use
:class:`AsyncClient`).

Over HTTPS the host's certificate must be issued for the ``server_name`` of its CLI config entry
when there is one, else for the host named in the URL, else (the URL holds an IP address) for
the ``-c`` name. Errors are :mod:`vmreplica.errors` classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, ParamSpec, Self, TypeVar, overload

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
from vmreplica._internal.sdk import Transport, wait
from vmreplica.errors import VmrError

__all__ = [
    "AsyncClient",
    "AuthEntry",
    "Client",
    "ConnectionTest",
    "Event",
    "Measurement",
    "RecoveryPoint",
    "Replication",
    "ServerSettings",
    "Vm",
    "VmrError",
]

M = TypeVar("M", bound=Model)
P = ParamSpec("P")
T = TypeVar("T")


# -- the methods, each described once -------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call: what to send, and how to turn the ``result`` into the return value."""

    method: str
    args: dict[str, Any]
    decode: Callable[[Any], T]


def _model(cls: type[M], method: str, args: dict[str, Any] | None = None) -> _Call[M]:
    return _Call(method, args or {}, cls.from_json)


def _models(cls: type[M], method: str, args: dict[str, Any] | None = None) -> _Call[list[M]]:
    return _Call(method, args or {}, lambda result: [cls.from_json(item) for item in result])


class _Endpoint(Generic[P, T]):
    """A method of both clients, from a function that describes its call: on a
    :class:`Client` it returns the result, on an :class:`AsyncClient` it is a coroutine.
    Typed per front end, so each method keeps its signature for mypy and IDEs."""

    def __init__(self, build: Callable[P, _Call[T]]) -> None:
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


class _Api:
    """What both clients share: where requests go, and every method of the API.

    A method here is an :class:`_Endpoint` over a function without ``self``: it only describes
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

    @_Endpoint
    def computer_name() -> _Call[str]:
        return _Call("host.info", {}, lambda result: str(result["computer_name"]))

    @_Endpoint
    def server_get() -> _Call[ServerSettings]:
        return _model(ServerSettings, "server.get")

    @_Endpoint
    def server_set(**changes: Any) -> _Call[ServerSettings]:
        """Keyword names as in ServerChanges: enabled, auth, certificate_port, any_server, …"""
        return _model(ServerSettings, "server.set", changes)

    @_Endpoint
    def auth_new(allowed_primary: str, storage_location: str, trust_group: str) -> _Call[AuthEntry]:
        return _model(
            AuthEntry,
            "auth.new",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    @_Endpoint
    def auth_get(
        allowed_primary: str | None = None, trust_group: str | None = None
    ) -> _Call[list[AuthEntry]]:
        return _models(
            AuthEntry, "auth.get", {"allowed_primary": allowed_primary, "trust_group": trust_group}
        )

    @_Endpoint
    def auth_set(
        allowed_primary: str,
        storage_location: str | None = None,
        trust_group: str | None = None,
    ) -> _Call[AuthEntry]:
        return _model(
            AuthEntry,
            "auth.set",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    @_Endpoint
    def auth_remove(
        allowed_primary: str | None = None, trust_group: str | None = None
    ) -> _Call[list[AuthEntry]]:
        return _models(
            AuthEntry,
            "auth.remove",
            {"allowed_primary": allowed_primary, "trust_group": trust_group},
        )

    @_Endpoint
    def test_connection(
        replica_server: str, replica_port: int, auth: str = "certificate"
    ) -> _Call[ConnectionTest]:
        return _model(
            ConnectionTest,
            "replication.test_connection",
            {
                "replica_server": replica_server,
                "replica_port": replica_port,
                "auth": auth,
            },
        )

    # -- VMs --------------------------------------------------------------------------------

    @_Endpoint
    def vm_new(
        name: str,
        memory: str | None = None,
        cpus: int | None = None,
        disks: list[dict[str, str]] | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
    ) -> _Call[Vm]:
        """``disks``: a list of ``{"size": "1G"}``, ``{"path": P}`` or ``{"parent": P}``."""
        return _model(
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

    @_Endpoint
    def vm_list() -> _Call[list[Vm]]:
        return _models(Vm, "vm.list")

    @_Endpoint
    def vm_get(name: str) -> _Call[Vm]:
        return _model(Vm, "vm.get", {"name": name})

    @_Endpoint
    def vm_start(name: str) -> _Call[Vm]:
        return _model(Vm, "vm.start", {"name": name})

    @_Endpoint
    def vm_stop(name: str, force: bool = False, timeout: float | None = None) -> _Call[Vm]:
        return _model(Vm, "vm.stop", {"name": name, "force": force, "timeout": timeout})

    @_Endpoint
    def vm_move(
        name: str, to: str, force: bool = False, timeout: float | None = None
    ) -> _Call[VmMove]:
        return _model(
            VmMove, "vm.move", {"name": name, "to": to, "force": force, "timeout": timeout}
        )

    @_Endpoint
    def vm_remove(name: str, force: bool = False, delete_storage: bool = False) -> _Call[Vm]:
        return _model(
            Vm, "vm.remove", {"name": name, "force": force, "delete_storage": delete_storage}
        )

    @_Endpoint
    def vm_monitor(name: str, command: str) -> _Call[str]:
        return _Call(
            "vm.monitor",
            {"name": name, "command": command},
            lambda result: str(result["output"]),
        )

    @_Endpoint
    def event_list(since: str | None = None) -> _Call[list[Event]]:
        return _models(Event, "event.list", {"since": since})

    # -- replication ------------------------------------------------------------------------

    @_Endpoint
    def replication_enable(
        vm: str,
        replica_server: str,
        replica_port: int,
        auth: str = "certificate",
        **settings: Any,
    ) -> _Call[Replication]:
        """``settings``: frequency, recovery_history, snapshot_frequency, compression,
        exclude_disks, auto_resynchronize, recovery_point_interval."""
        return _model(Replication, "replication.enable", {
            "vm": vm, "replica_server": replica_server, "replica_port": replica_port, "auth": auth, **settings,
        })  # fmt: skip

    @_Endpoint
    def replication_set(vm: str, **settings: Any) -> _Call[Replication]:
        return _model(Replication, "replication.set", {"vm": vm, **settings})

    @_Endpoint
    def replication_get(
        vm: str | None = None,
        state: str | None = None,
        health: str | None = None,
        mode: str | None = None,
    ) -> _Call[list[Replication]]:
        return _models(
            Replication,
            "replication.get",
            {"vm": vm, "state": state, "health": health, "mode": mode},
        )

    @_Endpoint
    def replication_measure(vm: str | None = None) -> _Call[list[Measurement]]:
        return _models(Measurement, "replication.measure", {"vm": vm})

    @_Endpoint
    def replication_enable_as_replica(
        vm: str, allowed_primary: str | None = None
    ) -> _Call[Replication]:
        """On the replica host: the VM ``vm`` of this host is the copy its replica starts from
        (``replication enable VM --as-replica``)."""
        return _model(Replication, "replication.enable", {
            "vm": vm, "as_replica": True, "allowed_primary": allowed_primary,
        })  # fmt: skip

    @_Endpoint
    def replication_start_initial(
        vm: str,
        use_backup: bool = False,
        destination: str | None = None,
        start_time: str | None = None,
        compressed: bool = False,
    ) -> _Call[Replication]:
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
        return _model(Replication, "replication.start_initial", args)

    @_Endpoint
    def replication_stop_initial(vm: str) -> _Call[Replication]:
        """Stop an initial replication of any kind, running or scheduled."""
        return _model(Replication, "replication.stop_initial", {"vm": vm})

    @_Endpoint
    def replication_import_initial(vm: str, path: str) -> _Call[Replication]:
        """On the replica host: import the offline media in ``path`` (a directory)."""
        return _model(Replication, "replication.import_initial", {"vm": vm, "path": path})

    @_Endpoint
    def replication_sync(vm: str) -> _Call[Replication]:
        return _model(Replication, "replication.sync", {"vm": vm})

    @_Endpoint
    def replication_suspend(vm: str) -> _Call[Replication]:
        return _model(Replication, "replication.suspend", {"vm": vm})

    @_Endpoint
    def replication_resume(
        vm: str,
        resynchronize: bool = False,
        start_time: str | None = None,
        continue_: bool = False,
    ) -> _Call[Replication]:
        """``continue_`` is ``--continue``: a suspended resynchronization goes on."""
        return _model(Replication, "replication.resume", {
            "vm": vm, "resynchronize": resynchronize, "start_time": start_time,
            "continue": continue_,
        })  # fmt: skip

    @_Endpoint
    def replication_stop(vm: str) -> _Call[Replication]:
        """Stop a resynchronization; the replica stays as it was before it."""
        return _model(Replication, "replication.stop", {"vm": vm})

    @_Endpoint
    def replication_remove(vm: str) -> _Call[Replication]:
        return _model(Replication, "replication.remove", {"vm": vm})

    @_Endpoint
    def replication_reset_statistics(vm: str) -> _Call[Replication]:
        return _model(Replication, "replication.reset_statistics", {"vm": vm})

    @_Endpoint
    def failover_start(
        vm: str,
        prepare: bool = False,
        as_test: bool = False,
        recovery_point: str | None = None,
        force: bool = False,
    ) -> _Call[Replication]:
        return _model(Replication, "failover.start", {
            "vm": vm, "prepare": prepare, "as_test": as_test, "recovery_point": recovery_point, "force": force,
        })  # fmt: skip

    @_Endpoint
    def failover_stop(vm: str) -> _Call[Replication]:
        return _model(Replication, "failover.stop", {"vm": vm})

    @_Endpoint
    def failover_complete(vm: str) -> _Call[Replication]:
        return _model(Replication, "failover.complete", {"vm": vm})

    @_Endpoint
    def recovery_point_list(vm: str) -> _Call[list[RecoveryPoint]]:
        return _models(RecoveryPoint, "recovery_point.list", {"vm": vm})


# -- front ends -----------------------------------------------------------------------------


class AsyncClient(_Api):
    """The management API for async code: every method is a coroutine."""

    async def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """A raw call: the ``result`` of ``method``; arguments that are None are left out."""
        return await self._transport.request(method, args)

    def _bind(self, build: Callable[P, _Call[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(build)
        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            call = build(*args, **kwargs)
            return call.decode(await self.call(call.method, call.args))

        return method


class Client(_Api):
    """The management API for synchronous code: every method blocks until the answer comes."""

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """A raw call: the ``result`` of ``method``; arguments that are None are left out."""
        return wait(functools.partial(self._transport.request, method, args))

    def _bind(self, build: Callable[P, _Call[T]]) -> Callable[P, T]:
        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> T:
            call = build(*args, **kwargs)
            return call.decode(self.call(call.method, call.args))

        return method
