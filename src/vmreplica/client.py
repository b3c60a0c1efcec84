"""The vmreplica Python SDK: typed calls to a host agent's management API.

The CLI is built on this module and nothing else, so whatever the CLI does a script can do::

    from vmreplica.client import Client

    host = Client.connect("vmhost2")          # a name from the CLI config, or None for local
    for vm in host.vm_list():
        print(vm.name, vm.state)

Calls are synchronous; each one is a single HTTP request over the local unix socket or over
HTTPS with the administrator's client certificate. Errors are :mod:`vmreplica.errors` classes.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from vmreplica._internal.certs import client_ssl_context
from vmreplica._internal.config import DEFAULT_SOCKET, RemoteHost, load_remote_host
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
)
from vmreplica.errors import AccessDenied, ConnectionFailed, VmrError, error_from_json

__all__ = [
    "AuthEntry",
    "Client",
    "ConnectionTest",
    "Event",
    "Measurement",
    "RecoveryPoint",
    "Replication",
    "ServerSettings",
    "Vm",
]

M = TypeVar("M", bound=Model)


def _default_socket() -> Path:
    return Path(os.environ.get("VMREPLICA_SOCKET", DEFAULT_SOCKET))


class Client:
    def __init__(
        self,
        socket: Path | None = None,
        remote: RemoteHost | None = None,
        timeout: float | None = None,
    ) -> None:
        self._socket = socket or _default_socket()
        self._remote = remote
        self._ssl: ssl.SSLContext | None = None
        self._timeout = timeout
        if remote is not None:
            self._ssl = client_ssl_context(remote.ca, remote.cert, remote.key)

    @classmethod
    def connect(cls, computer_name: str | None = None) -> Client:
        """The local agent when ``computer_name`` is None, else the host the CLI config names."""
        if computer_name is None:
            return cls()
        return cls(remote=load_remote_host(computer_name))

    @property
    def target(self) -> str:
        return self._remote.name if self._remote else f"the local agent ({self._socket})"

    # -- transport -------------------------------------------------------------------------

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        return asyncio.run(
            self._call(method, {k: v for k, v in (args or {}).items() if v is not None})
        )

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        body = json.dumps(args).encode()
        headers = {"Content-Type": "application/json"}
        try:
            if self._remote is None:
                connector = aiohttp.UnixConnector(path=str(self._socket))
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.post(f"http://agent/v1/{method}", data=body, headers=headers) as resp,
                ):
                    return _result(resp.status, await resp.read())
            url = f"{self._remote.url}/v1/{method}"
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    url,
                    data=body,
                    headers=headers,
                    ssl=self._ssl or True,
                    server_hostname=self._remote.name,
                ) as resp,
            ):
                return _result(resp.status, await resp.read())
        except aiohttp.ClientConnectorCertificateError as e:
            raise ConnectionFailed(
                f"{self.target}: its certificate is not trusted ({e.certificate_error})"
            ) from e
        except aiohttp.ClientConnectorError as e:
            err = e.os_error
            if isinstance(err, PermissionError):
                raise AccessDenied(
                    f"access denied to {self.target}: the management socket is root-only"
                ) from e
            if self._remote is None:
                raise ConnectionFailed(
                    f"cannot reach the local agent at {self._socket}: is `vmreplica host serve` running? "
                    "(set VMREPLICA_SOCKET or use -c NAME)"
                ) from e
            raise ConnectionFailed(
                f"cannot reach {self.target} at {self._remote.url}: {err.strerror or err}"
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            if self._remote is not None and isinstance(
                e, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError
            ):
                raise AccessDenied(
                    f"{self.target} refused the connection: is the administrator certificate "
                    f"{self._remote.cert} issued by its CA?"
                ) from e
            raise ConnectionFailed(
                f"{self.target}: request failed ({e or type(e).__name__})"
            ) from e

    def _models(self, cls: type[M], method: str, args: dict[str, Any] | None = None) -> list[M]:
        result = self.call(method, args)
        return [cls.from_json(item) for item in result]

    def _model(self, cls: type[M], method: str, args: dict[str, Any] | None = None) -> M:
        return cls.from_json(self.call(method, args))

    # -- host, server and authorization ----------------------------------------------------

    def computer_name(self) -> str:
        return str(self.call("host.info")["computer_name"])

    def server_get(self) -> ServerSettings:
        return self._model(ServerSettings, "server.get")

    def server_set(self, **changes: Any) -> ServerSettings:
        """Keyword names as in ServerChanges: enabled, auth, certificate_port, any_server, …"""
        return self._model(ServerSettings, "server.set", changes)

    def auth_new(self, allowed_primary: str, storage_location: str, trust_group: str) -> AuthEntry:
        return self._model(
            AuthEntry,
            "auth.new",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    def auth_get(
        self, allowed_primary: str | None = None, trust_group: str | None = None
    ) -> list[AuthEntry]:
        return self._models(
            AuthEntry, "auth.get", {"allowed_primary": allowed_primary, "trust_group": trust_group}
        )

    def auth_set(
        self,
        allowed_primary: str,
        storage_location: str | None = None,
        trust_group: str | None = None,
    ) -> AuthEntry:
        return self._model(
            AuthEntry,
            "auth.set",
            {
                "allowed_primary": allowed_primary,
                "storage_location": storage_location,
                "trust_group": trust_group,
            },
        )

    def auth_remove(
        self, allowed_primary: str | None = None, trust_group: str | None = None
    ) -> list[AuthEntry]:
        return self._models(
            AuthEntry,
            "auth.remove",
            {"allowed_primary": allowed_primary, "trust_group": trust_group},
        )

    def test_connection(
        self, replica_server: str, replica_port: int, auth: str = "certificate"
    ) -> ConnectionTest:
        return self._model(
            ConnectionTest,
            "replication.test_connection",
            {
                "replica_server": replica_server,
                "replica_port": replica_port,
                "auth": auth,
            },
        )

    # -- VMs --------------------------------------------------------------------------------

    def vm_new(
        self,
        name: str,
        memory: str | None = None,
        cpus: int | None = None,
        disks: list[dict[str, str]] | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
    ) -> Vm:
        """``disks``: a list of ``{"size": "1G"}``, ``{"path": P}`` or ``{"parent": P}``."""
        return self._model(
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

    def vm_list(self) -> list[Vm]:
        return self._models(Vm, "vm.list")

    def vm_get(self, name: str) -> Vm:
        return self._model(Vm, "vm.get", {"name": name})

    def vm_start(self, name: str) -> Vm:
        return self._model(Vm, "vm.start", {"name": name})

    def vm_stop(self, name: str, force: bool = False, timeout: float | None = None) -> Vm:
        return self._model(Vm, "vm.stop", {"name": name, "force": force, "timeout": timeout})

    def vm_remove(self, name: str, force: bool = False, delete_storage: bool = False) -> Vm:
        return self._model(
            Vm, "vm.remove", {"name": name, "force": force, "delete_storage": delete_storage}
        )

    def vm_monitor(self, name: str, command: str) -> str:
        return str(self.call("vm.monitor", {"name": name, "command": command})["output"])

    def event_list(self, since: str | None = None) -> list[Event]:
        return self._models(Event, "event.list", {"since": since})

    # -- replication ------------------------------------------------------------------------

    def replication_enable(
        self,
        vm: str,
        replica_server: str,
        replica_port: int,
        auth: str = "certificate",
        **settings: Any,
    ) -> Replication:
        """``settings``: frequency, recovery_history, snapshot_frequency, compression,
        exclude_disks, auto_resynchronize, recovery_point_interval."""
        return self._model(Replication, "replication.enable", {
            "vm": vm, "replica_server": replica_server, "replica_port": replica_port, "auth": auth, **settings,
        })  # fmt: skip

    def replication_set(self, vm: str, **settings: Any) -> Replication:
        return self._model(Replication, "replication.set", {"vm": vm, **settings})

    def replication_get(
        self,
        vm: str | None = None,
        state: str | None = None,
        health: str | None = None,
        mode: str | None = None,
    ) -> list[Replication]:
        return self._models(
            Replication,
            "replication.get",
            {"vm": vm, "state": state, "health": health, "mode": mode},
        )

    def replication_measure(self, vm: str | None = None) -> list[Measurement]:
        return self._models(Measurement, "replication.measure", {"vm": vm})

    def replication_start_initial(self, vm: str) -> Replication:
        return self._model(Replication, "replication.start_initial", {"vm": vm})

    def replication_sync(self, vm: str) -> Replication:
        return self._model(Replication, "replication.sync", {"vm": vm})

    def replication_suspend(self, vm: str) -> Replication:
        return self._model(Replication, "replication.suspend", {"vm": vm})

    def replication_resume(self, vm: str, resynchronize: bool = False) -> Replication:
        return self._model(
            Replication, "replication.resume", {"vm": vm, "resynchronize": resynchronize}
        )

    def replication_remove(self, vm: str) -> Replication:
        return self._model(Replication, "replication.remove", {"vm": vm})

    def replication_reset_statistics(self, vm: str) -> Replication:
        return self._model(Replication, "replication.reset_statistics", {"vm": vm})

    def failover_start(
        self,
        vm: str,
        prepare: bool = False,
        as_test: bool = False,
        recovery_point: str | None = None,
        force: bool = False,
    ) -> Replication:
        return self._model(Replication, "failover.start", {
            "vm": vm, "prepare": prepare, "as_test": as_test, "recovery_point": recovery_point, "force": force,
        })  # fmt: skip

    def failover_stop(self, vm: str) -> Replication:
        return self._model(Replication, "failover.stop", {"vm": vm})

    def failover_complete(self, vm: str) -> Replication:
        return self._model(Replication, "failover.complete", {"vm": vm})

    def recovery_point_list(self, vm: str) -> list[RecoveryPoint]:
        return self._models(RecoveryPoint, "recovery_point.list", {"vm": vm})


def _result(status: int, raw: bytes) -> Any:
    try:
        decoded = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        decoded = None
    if status >= 400 or not isinstance(decoded, dict) or "result" not in decoded:
        raise error_from_json(decoded, status)
    return decoded["result"]


__all__ += ["VmrError"]
