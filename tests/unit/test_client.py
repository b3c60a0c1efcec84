"""The SDK against a real aiohttp server: sync and async front ends, from plain code and from
inside a running event loop, errors rebuilt as their classes, and the name TLS checks."""

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

from vmreplica._internal import certs
from vmreplica._internal.config import RemoteHost, load_remote_host, tls_server_name
from vmreplica.client import AsyncClient, Client, Vm
from vmreplica.errors import ConnectionFailed, InvalidArgument, NotFound

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


# -- the name the host's certificate is checked against ---------------------------------------


def remote(name: str, url: str, server_name: str | None = None, files: Path = Path()) -> RemoteHost:
    return RemoteHost(
        name=name,
        url=url,
        ca=files / "admin" / "ca.pem",
        cert=files / "admin" / "cert.pem",
        key=files / "admin" / "key.pem",
        server_name=server_name,
    )


@pytest.mark.parametrize(
    ("url", "server_name", "expected"),
    [
        ("https://vmhost2.contoso.com:8442", None, "vmhost2.contoso.com"),
        ("https://VMHost2.Contoso.com:8442", None, "vmhost2.contoso.com"),
        ("https://127.0.0.1:8442", None, "vmhost2"),
        ("https://[::1]:8442", None, "vmhost2"),
        ("https://[2001:db8::7]", None, "vmhost2"),
        ("https://127.0.0.1:8442", "vmhost2.contoso.com", "vmhost2.contoso.com"),
        ("https://alias.contoso.com:8442", "vmhost2.contoso.com", "vmhost2.contoso.com"),
        ("https://[::1:8442", None, "vmhost2"),  # a broken URL: the request reports it
    ],
)
def test_tls_server_name(url: str, server_name: str | None, expected: str) -> None:
    assert tls_server_name(remote("vmhost2", url, server_name)) == expected


def test_cli_config_server_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cli.toml"
    monkeypatch.setenv("VMREPLICA_CONFIG", str(config))

    def entry(extra: str) -> str:
        head = (
            '[hosts."vmhost2"]\nurl = "https://10.0.0.2:8442/"\nca = "c"\ncert = "e"\nkey = "k"\n'
        )
        config.write_text(head + extra)
        return str(config)

    entry("")
    assert load_remote_host("vmhost2").server_name is None
    entry('server_name = "VMHost2.Contoso.com"\n')
    assert load_remote_host("vmhost2") == RemoteHost(
        "vmhost2", "https://10.0.0.2:8442", Path("c"), Path("e"), Path("k"), "vmhost2.contoso.com"
    )
    for value, why in [
        ('"*.contoso.com"', "is not a valid DNS name"),
        ('"10.0.0.2"', "looks like an IP address"),
        ('""', "empty DNS name"),
        ("2", "must be a string"),
    ]:
        path = entry(f"server_name = {value}\n")
        with pytest.raises(InvalidArgument) as error:
            load_remote_host("vmhost2")
        assert str(error.value).startswith(f'{path}: [hosts."vmhost2"] server_name')
        assert why in str(error.value)


@pytest.fixture(scope="module")
def https_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """An HTTPS agent whose certificate names only ``localhost``, and an administrator
    certificate from the same CA: what a host and the CLI config point at."""
    pki = tmp_path_factory.mktemp("pki")
    certs.new_ca(pki / "ca")
    server = certs.issue(pki / "ca", ["localhost"], pki / "server")
    certs.issue(pki / "ca", ["admin"], pki / "admin")
    tls = certs.server_ssl_context(server.ca, server.cert, server.key)  # client cert required
    with serving(Agent().app(), tls=tls) as port:
        yield pki, port


@pytest.mark.parametrize(
    ("name", "url_host", "server_name", "trusted"),
    [
        ("vmhost9", "localhost", None, True),  # the URL names a host: that name is checked
        ("vmhost9", "localhost", "vmhost9.contoso.com", False),  # server_name wins
        ("vmhost9", "127.0.0.1", "localhost", True),
        ("localhost", "127.0.0.1", None, True),  # an IP address in the URL: NAME is checked
        ("vmhost9", "127.0.0.1", None, False),
    ],
)
def test_https_checks_the_right_name(
    https_agent: tuple[Path, int], name: str, url_host: str, server_name: str | None, trusted: bool
) -> None:
    pki, port = https_agent
    client = Client(remote=remote(name, f"https://{url_host}:{port}", server_name, pki))
    if trusted:
        assert client.computer_name() == "vmhost1"
    else:
        with pytest.raises(ConnectionFailed, match=f"^{name}: its certificate is not trusted"):
            client.computer_name()


def test_async_client_over_https(https_agent: tuple[Path, int]) -> None:
    pki, port = https_agent
    client = AsyncClient(remote=remote("vmhost9", f"https://localhost:{port}", files=pki))
    assert asyncio.run(client.vm_get("web")) == Vm.from_json(VM)
