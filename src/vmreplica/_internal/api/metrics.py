"""Prometheus metrics: ``GET /metrics`` on the management listener (behind its mutual TLS, like
every management call) and, if host.toml says ``metrics_listen``, on a plain HTTP port bound to a
loopback address for a local scraper.

Every scrape reads the same engine state the management API answers from (``replication get``
and ``measure``, the cycle log, recovery points), so the numbers agree with the CLI's. Names and
labels follow Prometheus' conventions: base units (seconds, bytes, ratios), ``_total`` counters,
and one series per possible value for states (1 for the current one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmreplica import __version__
from vmreplica._internal.engine.services import Services
from vmreplica._internal.engine.states import State
from vmreplica.errors import InvalidArgument

HEALTHS = ("Normal", "Warning", "Critical")
Listening = Callable[[], dict[str, bool]]


class ReplicationCollector(Collector):
    def __init__(self, engine: Services, listening: Listening) -> None:
        self._engine = engine
        self._listening = listening

    def collect(self) -> Iterator[Metric]:
        engine, ctx = self._engine, self._engine.ctx
        now = datetime.now(UTC)
        labels = ["vm", "mode"]
        info = GaugeMetricFamily(
            "vmreplica_host_info", "This host agent.", labels=["host", "version"]
        )
        info.add_metric([ctx.host, __version__], 1)
        yield info
        up = GaugeMetricFamily(
            "vmreplica_listener_up", "Whether a listener accepts connections.", labels=["listener"]
        )
        for name, listening in self._listening().items():
            up.add_metric([name], 1 if listening else 0)
        yield up
        refused = CounterMetricFamily(
            "vmreplica_authorization_refusals",
            "Peers refused since the agent started, by reason.",
            labels=["reason"],
        )
        for reason in ("no-entry", "replication-disabled", "trust-group", "seed-primary"):
            refused.add_metric([reason], ctx.refusals[reason])
        yield refused

        g = _Families(labels)
        rows = {row.vm_id: row for row in ctx.stores.replications.all()}
        models = {m.vm_name: m for m in engine.replication.get(None, None, None, None)}
        for measured in engine.replication.measure(None):
            model = models[measured.vm_name]
            row = rows[model.vm_id]
            key = [model.vm_name, model.mode.lower()]
            for state in State:
                g.state.add_metric([*key, state.value], 1 if state == model.state else 0)
            for level in HEALTHS:
                g.health.add_metric([*key, level], 1 if level == model.health else 0)
            if measured.last_replication_time:
                last = datetime.fromisoformat(measured.last_replication_time)
                g.last_time.add_metric(key, last.timestamp())
                g.lag.add_metric(key, max(0.0, (now - last).total_seconds()))
            g.last_size.add_metric(key, measured.last_replication_size or 0)
            g.average_size.add_metric(key, measured.average_replication_size or 0)
            g.pending_size.add_metric(key, measured.pending_replication_size)
            if measured.average_replication_latency is not None:
                g.latency.add_metric(key, measured.average_replication_latency)
            totals = ctx.stores.cycles.totals(row.vm_id, row.stats_since)
            g.cycles.add_metric([*key, "succeeded"], totals.succeeded)
            g.cycles.add_metric([*key, "missed"], totals.missed)
            g.errors.add_metric(key, totals.failed)
            g.data.add_metric(key, totals.size)
            if row.mode == "Primary":
                g.sent.add_metric(key, totals.wire)
                if totals.wire:
                    g.compression.add_metric(key, totals.wired_size / totals.wire)
            progress = model.resynchronization_progress
            if progress is not None:
                g.resync.add_metric(key, progress / 100.0)
            if model.initial_replication_progress is not None:
                g.initial.add_metric(key, model.initial_replication_progress / 100.0)
            if row.mode == "Replica":
                g.points.add_metric(key, len(ctx.stores.points.all(row.vm_id)))
        yield from g.all()


class _Families:
    def __init__(self, labels: list[str]) -> None:
        def gauge(name: str, text: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"vmreplica_{name}", text, labels=[*labels, *(extra or [])])

        def counter(name: str, text: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"vmreplica_{name}", text, labels=[*labels, *(extra or [])])

        self.state = gauge("replication_state", "1 for the relationship's state.", ["state"])
        self.health = gauge("replication_health", "1 for its health (Hyper-V's rules).", ["health"])
        self.last_time = gauge(
            "last_replication_timestamp_seconds", "When the last delta was applied (or sent)."
        )
        self.lag = gauge("replication_lag_seconds", "Seconds since the last replication.")
        self.last_size = gauge("last_replication_size_bytes", "Data of the last delta.")
        self.average_size = gauge(
            "average_replication_size_bytes", "Average delta over the monitoring window."
        )
        self.pending_size = gauge("pending_replication_size_bytes", "Data not yet acknowledged.")
        self.latency = gauge(
            "average_replication_latency_seconds", "Average cycle time over the monitoring window."
        )
        self.cycles = counter(
            "replication_cycles", "Cycles since the statistics were reset, by result.", ["result"]
        )
        self.errors = counter("replication_errors", "Failed deliveries since the reset.")
        self.data = counter("replication_data_bytes", "Data delivered since the reset.")
        self.sent = counter(
            "replication_sent_bytes", "Bytes the primary put on the wire for deltas (compressed)."
        )
        self.compression = gauge(
            "replication_compression_ratio", "Data delivered per byte sent, since the reset."
        )
        self.resync = gauge("resynchronization_progress_ratio", "Blocks compared, 0 to 1.")
        self.initial = gauge("initial_replication_progress_ratio", "Initial copy done, 0 to 1.")
        self.points = gauge("recovery_points", "Recovery points kept by the replica.")

    def all(self) -> Iterator[Metric]:
        yield from vars(self).values()


def metrics_handler(
    engine: Services, listening: Listening
) -> Callable[[web.Request], Awaitable[web.Response]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicationCollector(engine, listening))

    async def handler(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def loopback_only(host: str) -> str:
    """The plain metrics port is for a scraper on this host only: a loopback address."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise InvalidArgument(
        f"metrics_listen {host}: the plain metrics port binds to a loopback address only "
        "(127.0.0.1 or ::1); remote scrapers use /metrics on the management listener, with TLS"
    )
