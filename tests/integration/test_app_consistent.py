"""Application-consistent recovery points (--snapshot-frequency) with a real Linux guest running
Debian's qemu-guest-agent: the freeze happens and is timed, the point is listed as
ApplicationConsistent and holds a clean file system, the thaw happens even when the agent is
killed while the guest is frozen, and a guest without the agent gets crash-consistent points
and a Warning that says why."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from tests import guest
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    restart_with_faults,
    wait_for,
)
from tests.integration.test_end_to_end import GUEST_CACHE
from tests.localcluster import Cluster


def guest_vm(pair: Pair, name: str, *extra_args: str) -> Path:
    """A running guest writing records; its serial console log."""
    cluster = pair.cluster
    assets = guest.build_guest_assets(GUEST_CACHE)
    data = cluster.base / f"{name}-data.qcow2"
    guest.make_data_disk(data, 64)
    cmdline = guest.kernel_cmdline(extra=" ".join(["vmr.progress=10", *extra_args]))
    cluster.cli("vm", "new", name, "--disk-path", str(data), "--kernel", str(assets.kernel),
                "--initrd", str(assets.initrd), "--append", cmdline, host=PRIMARY)  # fmt: skip
    cluster.cli("vm", "start", name, host=PRIMARY)
    vm_id = str(pair.json("vm", "get", name)[0]["id"])
    console = cluster.hosts[PRIMARY].state_dir / "run" / vm_id[:8] / "serial.log"
    wait_for(lambda: "vmr: records:" in console.read_text(errors="replace"), 90, "records")
    return console


def last_record(console: Path) -> int:
    found = re.findall(r"vmr: records: (\d+)", console.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def kinds(pair: Pair, vm: str) -> list[str]:
    return [p["kind"] for p in pair.json("recovery-point", "list", vm, host=REPLICA)]


def test_application_consistent_points_freeze_thaw_and_recover(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    console = guest_vm(pair, "db")
    assert "vmr: guest agent started" in console.read_text()
    pair.enable("db", "--snapshot-frequency", "1", "--recovery-history", "4",
                "--recovery-point-interval", "1")  # fmt: skip
    pair.start("db")
    pair.cli("replication", "sync", "db")  # the first cycle: due at once
    frozen = [
        e["message"] for e in pair.json("event", "list") if e["kind"] == "application-consistent"
    ]
    assert len(frozen) == 1, frozen
    print(f"\n{frozen[0]}")  # the freeze duration, for the closing note (pytest -s)
    seconds = float(re.search(r"frozen for ([\d.]+) s", frozen[0]).group(1))  # type: ignore[union-attr]
    assert 0 < seconds < 10
    assert kinds(pair, "db") == ["ApplicationConsistent", "Latest"]
    assert pair.measure("db")["health"] == "Normal"
    # Within the hour: crash-consistent cycles and Standard points.
    time.sleep(1.1)
    pair.cli("replication", "sync", "db")
    assert kinds(pair, "db") == ["ApplicationConsistent", "Standard", "Latest"]

    # The application-consistent point holds a clean file system and a valid record prefix.
    point = next(p["id"] for p in pair.json("recovery-point", "list", "db", host=REPLICA)
                 if p["kind"] == "ApplicationConsistent")  # fmt: skip
    cluster.cli("failover", "start", "db", "--recovery-point", point, "--force", host=REPLICA)
    report = guest.verify_records(pair.storage / "db" / "failover" / "disk0.qcow2")
    assert report.fsck_clean and not report.errors and report.count > 0, report.details
    cluster.cli("failover", "stop", "db", host=REPLICA)

    # The agent dies while the guest is frozen: the guest stays frozen (its writer blocks) until
    # the restarted agent thaws it.
    cluster.stop(PRIMARY)
    db = sqlite3.connect(cluster.hosts[PRIMARY].state_dir / "state.db")
    with db:
        db.execute("UPDATE replications SET app_consistent_at=NULL")  # due again now
    db.close()
    restart_with_faults(cluster, PRIMARY, "primary.while_frozen=kill")
    pair.cli("replication", "sync", "db", check=False)
    died_by_sigkill(cluster, PRIMARY)
    stuck = last_record(console)
    time.sleep(3)
    assert last_record(console) <= stuck + 10, "the writer went on: the guest was not frozen"
    cluster.start(PRIMARY)
    wait_for(lambda: last_record(console) > stuck + 20, 60, "the writer after the thaw")
    events = [e["message"] for e in pair.json("event", "list") if e["kind"] == "recovered"]
    assert any("thawed the file systems of db" in m for m in events), events
    pair.cli("replication", "sync", "db")
    assert pair.measure("db")["health"] == "Normal"


def test_guest_without_agent_gets_crash_consistent_points_and_a_warning(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    console = guest_vm(pair, "web", "vmr.qga=off")
    assert "guest agent started" not in console.read_text()
    pair.enable("web", "--snapshot-frequency", "1", "--recovery-history", "2",
                "--recovery-point-interval", "1")  # fmt: skip
    pair.start("web")
    pair.cli("replication", "sync", "web")
    measured = pair.measure("web")
    assert measured["health"] == "Warning", measured
    assert any("guest agent of VM web does not answer" in d for d in measured["health_details"])
    time.sleep(1.1)
    pair.cli("replication", "sync", "web")
    assert "ApplicationConsistent" not in kinds(pair, "web")
    assert "Standard" in kinds(pair, "web")
    # The guest was never frozen: its writer kept going.
    before = last_record(console)
    wait_for(lambda: last_record(console) > before, 30, "records")
