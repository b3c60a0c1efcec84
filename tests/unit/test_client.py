"""The SDK against a real aiohttp server: sync and async front ends, from plain code and from
inside a running event loop, errors rebuilt as their classes."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vmreplica.client import AsyncClient, Client, Vm
from vmreplica.errors import ConnectionFailed, NotFound

VM = {
    "computer_name": "vmhost1",
    "name": "web",
    "id": "6b1f",
    "state": "Running",
    "cpus": 1,
    "memory_mb": 512,
    "disks": [],
    "replication_state": "Disabled",
    "replication_health": None,
    "replication_mode": None,
}
CANNED: dict[str, Any] = {"host.info": {"computer_name": "vmhost1"}, "vm.list": [VM]}


@dataclass
class Agent:
    """What the fake agent was asked, in order: (method, arguments)."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def call(request: web.Request) -> web.Response:
            method, args = request.match_info["method"], await request.json()
            self.seen.append((method, args))
            if method in CANNED:
                return web.json_response({"result": CANNED[method]})
            if method in ("vm.get", "vm.stop") and args.get("name") == "web":
                return web.json_response({"result": VM})
            # As the agent's error middleware answers.
            error = {"type": "NotFound", "message": f"no VM named {args.get('name')!r}"}
            return web.json_response({"error": error}, status=404)

        app = web.Application()
        app.router.add_post("/v1/{method}", call)
        return app


@contextmanager
def serving(app: web.Application, unix: Path | None = None, tls: Any = None) -> Iterator[int]:
    """Serve ``app`` from its own loop in a thread of its own, like an agent in another
    process, so that a client blocking its caller's thread (or loop) cannot stall it. Yields
    the TCP port (0 on a unix socket)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site: web.BaseSite = (
        web.UnixSite(runner, str(unix))
        if unix
        else web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    )
    loop.run_until_complete(site.start())
    port = 0 if unix else int(runner.addresses[0][1])
    thread = threading.Thread(target=loop.run_forever, name="fake-agent", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Path]]:
    fake = Agent()
    sock = tmp_path_factory.mktemp("agent") / "agent.sock"
    with serving(fake.app(), unix=sock):
        yield fake, sock


def test_sync_client_from_plain_code(agent: tuple[Agent, Path]) -> None:
    fake, sock = agent
    client = Client(socket=sock)
    assert client.computer_name() == "vmhost1"
    assert client.vm_list() == [Vm.from_json(VM)]
    assert client.vm_stop("web").name == "web"
    assert fake.seen[-1] == ("vm.stop", {"name": "web", "force": False}), "None is left out"
    assert client.call("host.info") == {"computer_name": "vmhost1"}


def test_sync_client_inside_a_running_loop(agent: tuple[Agent, Path]) -> None:
    _, sock = agent

    async def application() -> None:
        loop = asyncio.get_running_loop()
        client = Client(socket=sock)
        assert client.vm_get("web") == Vm.from_json(VM)
        with pytest.raises(NotFound, match="no VM named 'ghost'"):
            client.vm_get("ghost")
        # The caller's loop was neither used nor harmed: nothing scheduled on it, still running.
        assert asyncio.all_tasks(loop) == {asyncio.current_task()}
        await asyncio.sleep(0)
        assert client.computer_name() == "vmhost1"

    asyncio.run(application())


def test_async_client(agent: tuple[Agent, Path]) -> None:
    _, sock = agent

    async def application() -> None:
        client = AsyncClient(socket=sock)
        assert inspect.iscoroutinefunction(client.vm_get)
        assert await client.vm_get("web") == Vm.from_json(VM)
        names = await asyncio.gather(*(client.computer_name() for _ in range(5)))
        assert names == ["vmhost1"] * 5
        assert await client.call("vm.list") == [VM]

    asyncio.run(application())


def test_errors_come_back_as_their_class(agent: tuple[Agent, Path], tmp_path: Path) -> None:
    _, sock = agent
    with pytest.raises(NotFound) as sync_error:
        Client(socket=sock).vm_remove("ghost")
    assert str(sync_error.value) == "no VM named 'ghost'"

    async def application() -> None:
        with pytest.raises(NotFound, match=r"^no VM named 'ghost'$"):
            await AsyncClient(socket=sock).vm_start("ghost")

    asyncio.run(application())

    with pytest.raises(ConnectionFailed, match=r"^cannot reach the local agent at "):
        Client(socket=tmp_path / "absent.sock").vm_list()
