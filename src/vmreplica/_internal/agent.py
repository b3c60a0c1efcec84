"""The host agent (``vmreplica host serve``): one process per hypervisor host.

Start-up order matters: open the database, recover interrupted operations and reattach to
running VMs, open the listeners last so that no request sees a half-recovered host. SIGTERM
closes the listeners and drops QMP connections; VMs keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from vmreplica._internal.api.listener import CertificateListener
from vmreplica._internal.api.methods import build_methods
from vmreplica._internal.api.mgmt import make_app
from vmreplica._internal.api.peer_routes import peer_routes
from vmreplica._internal.certs import server_ssl_context
from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu import children
from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.engine.failover import FailoverService
from vmreplica._internal.engine.primary import PrimaryEngine
from vmreplica._internal.engine.relationships import ReplicationService
from vmreplica._internal.engine.replica import ReplicaEngine
from vmreplica._internal.engine.server import ServerService
from vmreplica._internal.engine.vms import VmService
from vmreplica._internal.store.db import Database
from vmreplica.errors import ConnectionFailed, StorageError

log = logging.getLogger("vmreplica.agent")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers expect from a daemon."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("event", "vm"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("VMREPLICA_LOG_LEVEL", "INFO").upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Agent:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(config.state_dir, 0o700)
        except OSError as e:
            raise StorageError(
                f"cannot use state directory {config.state_dir}: {e.strerror or e}"
            ) from e
        self.db = Database(config.state_dir / "state.db")
        self.events = EventLog(self.db, config.name)
        self.server = ServerService(self.db, self.events, config)
        self.vms = VmService(self.db, self.events, config)
        self.primary = PrimaryEngine(self.db, self.events, config, self.vms)
        self.replica = ReplicaEngine(self.db, self.events, config, self.vms)
        self.primary.own_port = self._own_port
        self.replication = ReplicationService(
            config, self.server, self.vms, self.primary, self.replica
        )
        self.failover = FailoverService(
            self.db, self.events, config, self.vms, self.primary, self.replica
        )
        self.vms.start_guards.append(self.replica.start_guard)
        self.vms.start_guards.append(self.failover.start_guard)
        self.vms.on_off.append(self.primary.on_vm_off)
        self.listener = CertificateListener(self.server, peer_routes(self.replica, self.failover))
        self.server.listener = self.listener
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()

    def _own_port(self) -> int | None:
        settings = self.server.get()
        return settings.certificate_authentication_port if settings.replication_enabled else None

    async def start(self) -> None:
        # Helpers an earlier agent left running would hold the image locks recovery needs.
        storage = [Path(r.storage_dir) for r in self.replica.store.all() if r.storage_dir]
        ended = await asyncio.to_thread(children.end_leftovers, [self.config.state_dir, *storage])
        if ended:
            self.events.record(
                "leftovers-ended",
                f"ended {len(ended)} helper process(es) an earlier agent left running "
                f"(pids {', '.join(map(str, ended))})",
                level="warning",
            )
        await self.vms.recover()
        await self.replica.recover()
        await self.failover.recover()
        methods = build_methods(
            self.config, self.server, self.vms, self.events, self.replication, self.failover
        )
        await self.listener.apply(self.server.get(), self.server.listener_files())
        await self._serve_unix(make_app(methods, frozenset()))
        await self._serve_https(make_app(methods, frozenset(self.config.admins)))
        await self.primary.start()
        self.events.record(
            "agent-started", f"host agent {self.config.name} started (pid {os.getpid()})"
        )

    async def _serve_unix(self, app: web.Application) -> None:
        sock = self.config.socket
        try:
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot prepare management socket {sock}: {e.strerror or e}") from e
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # The socket is root-only: created under a umask that leaves no group/other bits.
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(sock)).start()
        finally:
            os.umask(old_umask)
        self._runners.append(runner)

    async def _serve_https(self, app: web.Application) -> None:
        host, port = self.config.mgmt_listen
        tls = self.config.tls
        context = server_ssl_context(tls.ca, tls.cert, tls.key)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True).start()
        except OSError as e:
            await runner.cleanup()
            raise ConnectionFailed(
                f"cannot listen on {host}:{port} for management: {e.strerror or e}"
            ) from e
        self._runners.append(runner)

    async def stop(self) -> None:
        await self.primary.stop()
        await self.replica.close_all_imports()
        await self.listener.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.vms.detach_all()
        with contextlib.suppress(OSError):
            self.config.socket.unlink()
        self.events.record("agent-stopped", f"host agent {self.config.name} stopped")
        self.db.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        log.info(
            "agent %s ready: socket %s, management https %s:%d",
            self.config.name,
            self.config.socket,
            *self.config.mgmt_listen,
        )
        ready_file = os.environ.get("VMREPLICA_READY_FILE")
        if ready_file:
            Path(ready_file).write_text(str(os.getpid()))
        await self._stop.wait()
        log.info("agent %s shutting down", self.config.name)
        await self.stop()


def serve(config: HostConfig) -> None:
    setup_logging()
    # Every file and directory the agent and its children make is private, whatever the mode
    # of the directory it lands in: replica images are copies of the guests' disks.
    os.umask(0o077)
    asyncio.run(Agent(config).run())
