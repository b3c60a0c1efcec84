"""Running the agent for real: systemd's notifications and watchdog (on a socket the test holds,
as systemd would), the unit `host install-service` writes (checked by systemd-analyze), and the
Prometheus metrics a scraper reads (parsed with prometheus_client's own parser)."""

from __future__ import annotations

import http.client
import itertools
import os
import signal
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.replication_env import PRIMARY, REPLICA, make_pair, replicated_vm
from tests.localcluster import Cluster, free_port

# What systemd puts in the service's environment.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC")


class NotifySocket:
    """The datagram socket systemd listens on for a service's sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.received: list[tuple[float, dict[str, str]]] = []

    def drain(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """What arrives within ``seconds``, with the time each arrived."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((time.monotonic(), fields))
        return self.received

    def wait_for(self, key: str, seconds: float) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _, fields in self.drain(0.2):
                if key in fields:
                    return fields
        raise AssertionError(f"no {key} from the agent in {seconds} s: {self.received}")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def notify(stopped_cluster: Cluster) -> Iterator[NotifySocket]:
    sock = NotifySocket(stopped_cluster.base / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def test_sd_notify_ready_watchdog_and_stopping(
    stopped_cluster: Cluster, notify: NotifySocket
) -> None:
    cluster = stopped_cluster
    os.environ.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000",
                      VMREPLICA_FAULTS="mgmt.call=block:4")  # fmt: skip
    try:
        host = cluster.start(PRIMARY)
    finally:
        for key in (*SYSTEMD_ENV, "VMREPLICA_FAULTS"):
            del os.environ[key]
    assert host.process is not None
    ready = notify.wait_for("READY", 10)
    assert ready["READY"] == "1" and ready["MAINPID"] == str(host.process.pid)
    assert host.socket.exists(), "READY comes once the management socket is up"
    # A VM it starts: QEMU inherits nothing of systemd's, and outlives the agent's stop.
    cluster.cli("vm", "new", "app", "--disk", "16M", host=PRIMARY)  # the loop is held 4 s here
    cluster.cli("vm", "start", "app", host=PRIMARY)
    notify.drain(2)
    pings = [t for t, fields in notify.received if fields.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Pinged every half interval (0.5 s) from the event loop; the 4 s the loop was stuck in
    # the management call left a gap that systemd's WatchdogSec would have caught.
    assert len(pings) >= 6 and max(gaps) > 3.5 and sorted(gaps)[len(gaps) // 2] < 0.8, gaps
    qemu = cluster.qemu_pids()
    assert len(qemu) == 1
    environ = Path(f"/proc/{qemu[0]}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
    assert cluster.stop(PRIMARY, signal.SIGTERM) == 0
    assert notify.wait_for("STOPPING", 5)["STOPPING"] == "1"
    os.kill(qemu[0], 0)  # still running: KillMode=process leaves the VMs alone


def test_install_service_writes_a_unit_systemd_accepts(cluster: Cluster, tmp_path: Path) -> None:
    units, tmpfiles = tmp_path / "system", tmp_path / "tmpfiles.d"
    units.mkdir()
    tmpfiles.mkdir()
    config = cluster.hosts[PRIMARY].config
    done = cluster.cli("host", "install-service", "--config", str(config), "--unit-dir",
                       str(units), "--tmpfiles-dir", str(tmpfiles))  # fmt: skip
    assert "PrivateTmp left out" in done.stdout, done.stdout  # this cluster lives in /tmp
    unit = (units / "vmreplica.service").read_text()
    for line in ("Type=notify", "KillMode=process", "WatchdogSec=30", "NoNewPrivileges=yes",
                 "ProtectSystem=full", "ProtectHome=yes", f"--config {config}"):  # fmt: skip
        assert line in unit, line
    assert "PrivateTmp" not in unit.replace("PrivateTmp left out", "")
    socket_dir = cluster.hosts[PRIMARY].socket.parent
    assert (tmpfiles / "vmreplica.conf").read_text().splitlines()[
        -1
    ] == f"d {socket_dir} 0700 root root -"
    verify = subprocess.run(["systemd-analyze", "verify", str(units / "vmreplica.service")],
                            capture_output=True, text=True)  # fmt: skip
    # verify reports unknown or misspelt directives on stderr but still exits 0.
    assert verify.returncode == 0 and "vmreplica.service" not in verify.stderr, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         str(units / "vmreplica.service")], capture_output=True, text=True,
    )  # fmt: skip
    score = security.stdout.strip().splitlines()[-1]
    print(f"\nsystemd-analyze security: {score}")  # for the closing note (pytest -s)
    assert "Overall exposure level" in score, security.stdout + security.stderr
    # A path systemd would hide is named, and the directive left out.
    home_config = tmp_path / "host.toml"
    data = {**_toml(config), "state_dir": "/root/vmreplica-state"}
    home_config.write_text(tomli_w.dumps(data))
    done = cluster.cli("host", "install-service", "--config", str(home_config), "--unit-dir",
                       str(units), "--tmpfiles-dir", str(tmpfiles))  # fmt: skip
    assert "ProtectHome left out: /root/vmreplica-state" in done.stdout, done.stdout
    assert "ProtectHome" not in (units / "vmreplica.service").read_text().split("[Service]")[1]
    missing = cluster.cli("host", "install-service", "--config", str(config), "--unit-dir",
                          str(tmp_path / "nope"), check=False)  # fmt: skip
    assert missing.returncode != 0 and "no such directory" in missing.stderr


def _toml(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())


def scrape(cluster: Cluster, host: str, cert: Path | None = None) -> tuple[int, str]:
    """GET /metrics on the management listener with the administrator's certificate."""
    context = ssl.create_default_context(cafile=str(cluster.ca_dir / "ca.pem"))
    context.check_hostname = False  # the certificate names the host; we dial 127.0.0.1
    directory = cert or cluster.base / "admin"
    context.load_cert_chain(str(directory / "cert.pem"), str(directory / "key.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", cluster.hosts[host].mgmt_port, context=context)
    try:
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_metrics_agree_with_measure_and_need_an_admin(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "2", "--recovery-point-interval", "1")
    for pattern in (0x21, 0x22):
        time.sleep(1.1)
        pair.write("app", 0, pattern, "4M", "2M")
        pair.cli("replication", "sync", "app")
    # A host with no authorization entry is refused (and counted by reason).
    refused = cluster.cli("replication", "test-connection", "--replica-server", REPLICA,
                          "--replica-port", str(pair.port), host="vmhost3", check=False)  # fmt: skip
    assert refused.returncode != 0

    status, text = scrape(cluster, PRIMARY)
    assert status == 200, text
    shown = [line for line in text.splitlines() if "0.0" not in line or "state=" not in line]
    print("\n" + "\n".join(shown))  # a sample for the closing note (pytest -s)
    found = samples(text)
    measured = pair.measure("app")
    primary = {"vm": "app", "mode": "primary"}
    assert value(found, "vmreplica_replication_state", **primary, state="Replicating") == 1
    assert value(found, "vmreplica_replication_state", **primary, state="Suspended") == 0
    assert value(found, "vmreplica_replication_health", **primary, health="Normal") == 1
    assert (
        value(found, "vmreplica_replication_cycles_total", **primary, result="succeeded")
        == (measured["successful_replication_count"])
    )
    assert (
        value(found, "vmreplica_pending_replication_size_bytes", **primary)
        == (measured["pending_replication_size"])
    )
    assert (
        value(found, "vmreplica_last_replication_size_bytes", **primary)
        == (measured["last_replication_size"])
    )
    assert 0 <= value(found, "vmreplica_replication_lag_seconds", **primary) < 600
    sent = value(found, "vmreplica_replication_sent_bytes_total", **primary)
    assert 0 < sent < 4 << 20, sent  # two 2 MiB patterned deltas, zstd-compressed
    assert value(found, "vmreplica_replication_compression_ratio", **primary) > 10
    assert value(found, "vmreplica_listener_up", listener="management") == 1
    assert value(found, "vmreplica_host_info", host=PRIMARY, version="0.1.0") == 1

    status, text = scrape(cluster, REPLICA)
    found = samples(text)
    replica = {"vm": "app", "mode": "replica"}
    points = [
        p for p in pair.json("recovery-point", "list", "app", host=REPLICA) if p["id"] != "Latest"
    ]
    assert value(found, "vmreplica_recovery_points", **replica) == len(points) > 0
    assert value(found, "vmreplica_listener_up", listener="certificate") == 1
    assert value(found, "vmreplica_authorization_refusals_total", reason="no-entry") >= 1
    assert value(found, "vmreplica_authorization_refusals_total", reason="trust-group") == 0

    # The management listener's rule: administrators only.
    status, text = scrape(cluster, PRIMARY, cert=cluster.hosts[REPLICA].dir / "tls")
    assert status == 403 and "not an administrator" in text


def test_metrics_on_a_plain_loopback_port(stopped_cluster: Cluster) -> None:
    cluster = stopped_cluster
    host = cluster.hosts[PRIMARY]
    port = free_port()
    data = {**_toml(host.config), "metrics_listen": f"127.0.0.1:{port}"}
    host.config.write_text(tomli_w.dumps(data))
    cluster.start(PRIMARY)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/metrics")
    answer = conn.getresponse()
    found = samples(answer.read().decode())
    assert answer.status == 200
    assert value(found, "vmreplica_listener_up", listener="metrics") == 1
    conn.request("POST", "/v1/vm.list", body=b"{}")
    assert conn.getresponse().status == 404, "nothing but /metrics on the plain port"
    conn.close()
    cluster.stop(PRIMARY)
    # Anything but a loopback address is refused, by `host init` and by the agent.
    data["metrics_listen"] = "0.0.0.0:9464"
    host.config.write_text(tomli_w.dumps(data))
    with pytest.raises(RuntimeError, match="loopback address only"):
        cluster.start(PRIMARY, timeout=15)
