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
from typing import Any, ParamSpec, TypeVar

from vmreplica._internal.api_calls import Api, Call
from vmreplica._internal.models import (
    AuthEntry,
    ConnectionTest,
    Event,
    Measurement,
    RecoveryPoint,
    Replication,
    ServerSettings,
    Vm,
)
from vmreplica._internal.sdk import wait
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

P = ParamSpec("P")
T = TypeVar("T")


# -- front ends -----------------------------------------------------------------------------


class AsyncClient(Api):
    """The management API for async code: every method is a coroutine."""

    async def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """A raw call: the ``result`` of ``method``; arguments that are None are left out."""
        return await self._transport.request(method, args)

    def _bind(self, build: Callable[P, Call[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(build)
        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            call = build(*args, **kwargs)
            return call.decode(await self.call(call.method, call.args))

        return method


class Client(Api):
    """The management API for synchronous code: every method blocks until the answer comes."""

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """A raw call: the ``result`` of ``method``; arguments that are None are left out."""
        return wait(functools.partial(self._transport.request, method, args))

    def _bind(self, build: Callable[P, Call[T]]) -> Callable[P, T]:
        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> T:
            call = build(*args, **kwargs)
            return call.decode(self.call(call.method, call.args))

        return method
