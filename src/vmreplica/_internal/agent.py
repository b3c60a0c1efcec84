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
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from vmreplica._internal import certs
from vmreplica._internal.api.errors import Handler
from vmreplica._internal.api.kerberos_listener import KerberosListener, Listeners
from vmreplica._internal.api.listener import CertificateListener
from vmreplica._internal.api.methods import build_methods
from vmreplica._internal.api.metrics import loopback_only, metrics_handler
from vmreplica._internal.api.mgmt import make_app
from vmreplica._internal.api.peer_routes import peer_routes
from vmreplica._internal.certs import server_ssl_context
from vmreplica._internal.cluster.etcd import Etcd
from vmreplica._internal.cluster.member import Member, cluster_config
from vmreplica._internal.config import HostConfig
from vmreplica._internal.drivers.qemu.driver import QemuDriver
from vmreplica._internal.engine.context import Context
from vmreplica._internal.engine.events import EventLog
from vmreplica._internal.engine.journal import Journal
from vmreplica._internal.engine.replica import handoff
from vmreplica._internal.engine.replica.ha import ReplicaHa
from vmreplica._internal.engine.services import build as build_engine
from vmreplica._internal.memory import tune_allocator
from vmreplica._internal.ports.hypervisor import HypervisorDriver
from vmreplica._internal.store.db import Database
from vmreplica._internal.store.stores import Stores
from vmreplica._internal.systemd import Notifier
from vmreplica._internal.transport.peer import CERTIFICATE, KERBEROS
from vmreplica.errors import ConnectionFailed, StorageError, VmrError

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


def make_driver(config: HostConfig) -> HypervisorDriver:
    """The one place a driver is chosen (host.toml's ``driver``). libvirt-python is imported
    only on a host that uses it."""
    if config.driver == "libvirt":
        from vmreplica._internal.drivers.libvirt.driver import LibvirtDriver

        return LibvirtDriver(config.libvirt_uri, config.accel)
    return QemuDriver(config.accel)


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
        stores = Stores.open(self.db)
        self.events = EventLog(stores.events, config.name)
        ctx = Context(
            config, stores, self.events, Journal(stores.journal, self.events),
            make_driver(config), own_port=self._own_port,
        )  # fmt: skip
        self.member = self._cluster_member(config, ctx)
        ctx.cluster = self.member
        self.engine = build_engine(ctx)
        self.ha = self._cluster_ha(ctx)
        routes = peer_routes(self.engine)
        self.listener = CertificateListener(self.engine.server, self.engine.auth, routes)
        self.kerberos = KerberosListener(
            self.engine.server, self.engine.auth, routes, config.kerberos_keys, config.name
        )
        self.listeners = Listeners(self.listener, self.kerberos)
        self.engine.server.listener = self.listeners
        self._runners: list[web.AppRunner] = []
        self._mgmt_context: ssl.SSLContext | None = None
        self._stop = asyncio.Event()
        self.systemd = Notifier()

    def _cluster_member(self, config: HostConfig, ctx: Context) -> Member | None:
        cluster = config.cluster
        if cluster is None:
            return None

        def address() -> str:
            # Where a primary reaches this node's replication listener: a redirect names it.
            port = self._own_port(CERTIFICATE)
            return f"{config.mgmt_listen[0]}:{port}" if port else ""

        async def fenced() -> None:
            self.events.record(
                "cluster-fenced",
                f"node {config.name} lost its lease of cluster {cluster.name}: it applies "
                "no delta until the lease is valid again",
                level="warning",
            )
            if self.ha is not None:  # the VMs it runs stop now (engine/replica/ha.py)
                await self.ha.fenced()

        def can_take(vm_id: str, info: dict[str, Any]) -> bool:
            # A VM whose relationship this node holds, or whose facts lie in one of this
            # node's storage locations (the shared storage; engine/replica/handoff.py).
            if ctx.stores.replications.find(vm_id) is not None:
                return True
            storage = info.get("storage")
            if not isinstance(storage, str):
                return False
            path = Path(storage)
            return path.parent in self._storage_locations() and (path / handoff.FILE).exists()

        async def acquired(vm_id: str) -> None:
            assert self.member is not None
            if await self.engine.primary.attach.acquired(vm_id):  # a primary VM (vm move)
                return
            storage = self.member.registry.get(vm_id, {}).get("storage")
            if isinstance(storage, str) and self.ha is not None:
                await self.ha.acquired(vm_id, Path(storage))

        async def settings(snapshot: dict[str, Any], revision: int) -> None:
            await self.engine.cluster_settings.apply(snapshot, revision)

        return Member(
            Etcd(cluster.etcd, ssl=cluster.ssl_context()), cluster.name, config.name, address, cluster.lease_ttl,
            on_fenced=fenced, can_take=can_take, on_settings=settings, on_acquired=acquired,
        )  # fmt: skip

    def _cluster_ha(self, ctx: Context) -> ReplicaHa | None:
        member = self.member
        if member is None:
            return None
        return ReplicaHa(
            ctx, self.engine.vms, self.engine.replica.recovery,
            lambda: set(member.owned), lambda: member.fence.remaining,
        )  # fmt: skip

    async def _join_cluster(self) -> None:
        """Join before serving, and own again the replicas this node holds (their keys went
        with the lease of the previous run, or go when it expires: the placement loop)."""
        member = self.member
        if member is None:
            return
        if not member.etcd.authenticated:
            self.events.record(
                "cluster-etcd-unauthenticated",
                f"etcd is reached over plain http ({', '.join(member.etcd.endpoints)}), without "
                "authentication: anyone who reaches its port can authorize their own primary or "
                "take VMs (use https:// with etcd_ca, etcd_cert, etcd_key: docs/CLUSTER.md)",
                level="warning",
            )
        try:
            await member.join()
        except BaseException:  # etcd refused or down: the agent stops, with one line
            await member.etcd.close()
            raise
        snapshot, _ = await member.settings()
        if snapshot is None:  # the first node: its settings become the cluster's
            await self.engine.cluster_settings.publish()
        member.start()
        if self.ha is not None:
            self.ha.start()
        for row in self.engine.ctx.stores.replications.all():
            if row.mode == "Replica" and row.storage_dir:
                await member.register(row.vm_id, {"storage": row.storage_dir})
                await member.take(row.vm_id)
        await self.engine.primary.move.joined()
        broker = (await cluster_config(member.etcd, member.cluster)).get("broker")
        if broker and broker not in certs.cert_dns_names(self.config.tls.cert):
            self.events.record(
                "cluster-broker-certificate",
                f"this node's certificate does not carry the broker name {broker}: primaries "
                "replicating to it refuse this node (`vmreplica cluster broker add --ca`)",
                level="warning",
            )
        self.events.record(
            "cluster-joined",
            f"node {self.config.name} joined cluster {member.cluster} (lease {member.ttl} s, "
            f"owns {len(member.owned)} VM(s))",
        )

    def _storage_locations(self) -> set[Path]:
        settings = self.engine.server.get()
        locations = {Path(e.replica_storage_location) for e in self.engine.auth.auth_list()}
        if settings.default_storage_location:
            locations.add(Path(settings.default_storage_location))
        return locations

    def _own_port(self, auth: str) -> int | None:
        settings = self.engine.server.get()
        if not settings.replication_enabled or settings.allowed_authentication_type not in (
            auth,
            "both",
        ):
            return None
        if auth == KERBEROS:
            return settings.kerberos_authentication_port
        return settings.certificate_authentication_port

    async def start(self) -> None:
        # Helpers an earlier agent left running would hold the image locks recovery needs.
        ctx = self.engine.ctx
        storage = [Path(r.storage_dir) for r in ctx.stores.replications.all() if r.storage_dir]
        ended = await asyncio.to_thread(ctx.driver.end_leftovers, [self.config.state_dir, *storage])
        if ended:
            self.events.record(
                "leftovers-ended",
                f"ended {len(ended)} helper process(es) an earlier agent left running "
                f"(pids {', '.join(map(str, ended))})",
                level="warning",
            )
        await self.engine.recover()
        await self._join_cluster()
        await self.listeners.apply(self.engine.server.get(), self.engine.server.listener_files())
        methods = build_methods(self.engine)
        metrics = metrics_handler(self.engine, self._listening)
        await self._serve_unix(make_app(methods, frozenset(), metrics))
        await self._serve_https(make_app(methods, frozenset(self.config.admins), metrics))
        if self.config.metrics_listen is not None:
            await self._serve_metrics(metrics, *self.config.metrics_listen)
        await self.engine.primary.scheduler.start()
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
        context = server_ssl_context(tls.ca, tls.cert, tls.key, tls.crl)
        self._mgmt_context = context
        await self._serve_tcp(app, host, port, context, "management")

    def reload_crl(self) -> None:
        """SIGHUP: read host.toml's CRL again into the contexts of both TLS listeners. A CRL
        that cannot be read changes nothing: the revocations loaded before stay in force."""
        crl = self.config.tls.crl
        if crl is None:
            self.events.record(
                "crl-reload-skipped", "SIGHUP: host.toml names no CRL", level="warning"
            )
            return
        try:
            count = certs.load_crl(self._mgmt_context, crl) if self._mgmt_context else 0
            self.listener.reload_crl(crl)
        except VmrError as e:
            self.events.record("crl-reload-failed", f"SIGHUP: {e.message}", level="warning")
            return
        self.events.record("crl-reloaded", f"reloaded CRL {crl}: {count} revoked certificate(s)")

    def _listening(self) -> dict[str, bool]:
        return {
            "certificate": self.listener.port is not None,
            "kerberos": self.kerberos.port is not None,
            "management": bool(self._runners),
            "metrics": self.config.metrics_listen is not None,
        }

    async def _serve_metrics(self, handler: Handler, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", handler)
        await self._serve_tcp(app, loopback_only(host), port, None, "metrics")

    async def _serve_tcp(
        self, app: web.Application, host: str, port: int, context: ssl.SSLContext | None,
        what: str,
    ) -> None:  # fmt: skip
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True).start()
        except OSError as e:
            await runner.cleanup()
            raise ConnectionFailed(
                f"cannot listen on {host}:{port} for {what}: {e.strerror or e}"
            ) from e
        self._runners.append(runner)

    async def stop(self) -> None:
        await self.engine.primary.scheduler.stop()
        await self.engine.replica.initial.close_all()
        await self.listener.close()
        await self.kerberos.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.engine.vms.runtime.detach_all()
        if self.ha is not None:
            await self.ha.stop()
        if self.member is not None:
            await self.member.stop()
            await self.member.etcd.close()
        with contextlib.suppress(OSError):
            self.config.socket.unlink()
        self.events.record("agent-stopped", f"host agent {self.config.name} stopped")
        self.db.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_crl)
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
        self.systemd.send(
            "READY=1", f"STATUS=serving as {self.config.name}", f"MAINPID={os.getpid()}"
        )
        watchdog = asyncio.create_task(self._watchdog(), name="systemd-watchdog")
        await self._stop.wait()
        log.info("agent %s shutting down", self.config.name)
        self.systemd.send("STOPPING=1", "STATUS=stopping; the VMs keep running")
        watchdog.cancel()
        await self.stop()

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop itself, twice per interval: a loop that is
        stuck (a blocking call, a deadlock) stops pinging, and systemd restarts the agent."""
        if self.systemd.watchdog is None:
            return
        while True:
            self.systemd.send("WATCHDOG=1")
            await asyncio.sleep(self.systemd.watchdog / 2)


def serve(config: HostConfig) -> None:
    setup_logging()
    # Before any thread exists: arenas are per thread (memory.py says why).
    tune_allocator()
    # Every file and directory the agent and its children make is private, whatever the mode
    # of the directory it lands in: replica images are copies of the guests' disks.
    os.umask(0o077)
    asyncio.run(Agent(config).run())
