"""Bandwidth caps through real agents, measured on the way out: deltas at a counting proxy
between the agents, the initial copy (QEMU's NBD, which does not pass the proxy) as the bytes
its qemu-img process writes to the socket; each within 10% of the cap, sustained (from a second
after the first byte)."""

from __future__ import annotations

from tests.integration.peer_tools import ConvertSampler, TcpProxy
from tests.integration.replication_env import PRIMARY, REPLICA, make_pair, verified_equal
from tests.localcluster import Cluster

MBIT = 1_000_000


def _within(rate: float, cap: int) -> bool:
    return 0.9 * cap <= rate <= 1.1 * cap


def test_initial_copy_and_deltas_hold_to_the_caps(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    with TcpProxy(pair.port) as proxy:
        cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
        cluster.cli("vm", "start", "app", host=PRIMARY)
        pair.write("app", 0, 0x11, "0", "32M")
        refused = cluster.cli("replication", "enable", "app", "--replica-server", REPLICA,
                              "--replica-port", str(proxy.port), "--max-bandwidth", "fast",
                              host=PRIMARY, check=False)  # fmt: skip
        assert refused.returncode == 2 and "invalid --max-bandwidth 'fast'" in refused.stderr
        assert cluster.cli_json("replication", "get", host=PRIMARY) == []
        enabled = cluster.cli_json(
            "replication", "enable", "app", "--replica-server", REPLICA, "--replica-port",
            str(proxy.port), "--compression", "false", "--max-bandwidth", "48M", host=PRIMARY,
        )[0]  # fmt: skip
        assert enabled["max_bandwidth_bps"] == 48 * MBIT
        sampler = ConvertSampler(str(cluster.base))
        sampler.start()
        try:
            pair.start("app")
        finally:
            sampler.stop.set()
            sampler.join()
        sent, rate = sampler.rate()
        assert sent > 24 << 20 and _within(rate, 48 * MBIT), (sent, rate)  # the last sample aside
        proxy.take_upstream_rate()

        cluster.cli("replication", "set", "app", "--max-bandwidth", "16M", host=PRIMARY)
        pair.write("app", 0, 0x22, "40M", "8M")
        cluster.cli("replication", "sync", "app", host=PRIMARY)
        sent, rate = proxy.take_upstream_rate()
        assert sent > 8 << 20 and _within(rate, 16 * MBIT), (
            sent,
            rate,
            cluster.cli_json("replication", "measure", "app", host=PRIMARY),
        )

        # The host's cap holds a VM without one of its own.
        cluster.cli("replication", "set", "app", "--max-bandwidth", "0", host=PRIMARY)
        cluster.cli("server", "set", "--max-bandwidth", "24M", host=PRIMARY)
        assert cluster.cli_json("server", "get", host=PRIMARY)[0]["max_bandwidth_bps"] == 24 * MBIT
        pair.write("app", 0, 0x33, "50M", "8M")
        cluster.cli("replication", "sync", "app", host=PRIMARY)
        sent, rate = proxy.take_upstream_rate()
        assert sent > 8 << 20 and _within(rate, 24 * MBIT), (sent, rate)
        verified_equal(pair)

        # A schedule whose catch-all rule lifts the cap: this delta goes at full speed.
        cluster.cli("server", "set", "--bandwidth-schedule", "Mon-Sun 00:00-24:00=0", host=PRIMARY)
        pair.write("app", 0, 0x44, "20M", "8M")
        cluster.cli("replication", "sync", "app", host=PRIMARY)
        sent, rate = proxy.take_upstream_rate()
        assert sent > 8 << 20 and rate > 2 * 24 * MBIT, (sent, rate)
        verified_equal(pair)
