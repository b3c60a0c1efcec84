"""Replication end to end through the CLI: enable, initial replication, delta cycles, recovery
points, statistics and health, suspend/resume, remove."""

from __future__ import annotations

import time

from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    make_pair,
    qemu_img_check,
    wait_for,
)
from tests.localcluster import Cluster


def test_replicate_running_vm(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", "--disk", "32M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "1M")
    pair.write("app", 1, 0x22, "4M", "256k")

    enabled = pair.enable(
        "app", "--frequency", "30", "--recovery-history", "2", "--recovery-point-interval", "3"
    )
    assert enabled["state"] == "ReadyForInitialReplication" and enabled["health"] == "Warning"
    assert enabled["mode"] == "Primary" and enabled["replica_server"] == REPLICA
    replica_vm = pair.json("vm", "get", "app", host=REPLICA)[0]
    assert replica_vm["id"] == cluster.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"]
    assert replica_vm["replication_mode"] == "Replica"
    assert replica_vm["replication_state"] == "WaitingForInitialReplication"
    refused = cluster.cli("vm", "start", "app", host=REPLICA, check=False)
    assert refused.returncode == 4 and "can only run after a failover" in refused.stderr

    pair.start("app")
    # Writes made during and after the copy reach the replica with the next cycle.
    pair.write("app", 0, 0x33, "2M", "512k")
    pair.write("app", 1, 0x44, "0", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    for disk in (0, 1):
        assert pair.equal("app", disk)
        qemu_img_check(pair.tip("app", disk))
    assert pair.replication("app", REPLICA)["state"] == "Replicating"

    # The scheduler ships changes by itself within the frequency (30 s): the replica comes to
    # equal the primary with no sync. (Not "the count moved, so the write is there": a cycle cut
    # before the write and acknowledged after the count was read moves it too, and after the
    # restart below the cycle the agent runs at once at start-up is often just that one.)
    before = pair.measure("app")["successful_replication_count"]
    pair.write("app", 0, 0x55, "8M", "1M")
    wait_for(lambda: pair.equal("app", 0), 45, "a scheduled cycle to ship the write")
    wait_for(lambda: pair.measure("app")["successful_replication_count"] != before, 45, "its count")
    # After an agent restart the schedule resumes by itself.
    cluster.stop(PRIMARY)
    cluster.start(PRIMARY)
    pair.write("app", 0, 0x56, "10M", "64k")
    wait_for(lambda: pair.equal("app", 0), 45, "a cycle after restart to ship the write")

    # Recovery points: every 3 s a new one, at most 2 kept, plus Latest. A scheduled cycle may
    # be applying meanwhile: its point is frozen (three Standard points) a moment before the
    # oldest is folded into base, so the list is the one it settles to.
    for pattern in (0x61, 0x62, 0x63):
        time.sleep(3.2)
        pair.write("app", 0, pattern, "16M", "64k")
        cluster.cli("replication", "sync", "app", host=PRIMARY)

    def point_kinds() -> list[object]:
        return [p["kind"] for p in pair.json("recovery-point", "list", "app", host=REPLICA)]

    wait_for(lambda: point_kinds() == ["Standard", "Standard", "Latest"], 30, "two points kept")
    points = pair.json("recovery-point", "list", "app", host=REPLICA)
    assert [p["kind"] for p in points][:2] == ["Standard", "Standard"]
    assert int(str(points[0]["id"])) < int(str(points[1]["id"]))

    # Nothing is pending once the last cycle is acknowledged; a scheduled cycle may have cut its
    # (empty) delta between the sync and this measure, and holds it until the replica has it.
    wait_for(lambda: pair.measure("app")["pending_replication_size"] == 0, 30, "an empty log")
    measured = pair.measure("app")
    assert measured["health"] == "Normal", measured["health_details"]
    assert measured["successful_replication_count"] >= 6
    assert measured["initial_replication_size"]
    assert measured["average_replication_latency"] is not None
    replica_measure = pair.measure("app", REPLICA)
    assert (
        replica_measure["successful_replication_count"] >= 6
        and replica_measure["health"] == "Normal"
    )

    # Suspend keeps changes, resume sends them.
    cluster.cli("replication", "suspend", "app", host=PRIMARY)
    suspended = pair.measure("app")
    assert suspended["state"] == "Suspended" and suspended["health"] == "Warning"
    pair.write("app", 1, 0x77, "1M", "128k")
    cluster.cli("replication", "resume", "app", host=PRIMARY)
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    assert pair.equal("app", 1)

    # Reset while suspended: a scheduled cycle could otherwise start (and be counted) between
    # the reset and the measure.
    cluster.cli("replication", "suspend", "app", host=PRIMARY)
    cluster.cli("replication", "reset-statistics", "app", host=PRIMARY)
    assert pair.measure("app")["successful_replication_count"] == 0

    kinds = [e["kind"] for e in cluster.cli_json("event", "list", host=PRIMARY)]
    assert "replication-enabled" in kinds and "initial-replication-done" in kinds
    # Removing: each side separately; the replica VM stays as an ordinary VM.
    guarded = cluster.cli("vm", "remove", "app", "--force", host=PRIMARY, check=False)
    assert guarded.returncode == 4 and "replication remove app" in guarded.stderr
    cluster.cli("replication", "remove", "app", host=REPLICA)
    vm = pair.json("vm", "get", "app", host=REPLICA)[0]
    assert vm["replication_state"] == "Disabled"
    cluster.cli("replication", "remove", "app", host=PRIMARY)
    assert pair.json("replication", "get", host=PRIMARY) == []


def test_replicate_vm_that_is_off(any_cluster: Cluster) -> None:
    cluster = any_cluster  # on each driver
    pair = make_pair(cluster)
    parent = cluster.base / "parent.qcow2"
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(parent), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2M", str(parent)], check=True,
                   capture_output=True)  # fmt: skip
    cluster.cli("vm", "new", "off1", "--disk-parent", str(parent), host=PRIMARY)
    pair.enable("off1")
    pair.start("off1")
    # The differencing disk arrived complete, parent included.
    assert pair.equal("off1", 0)
    # Writes made while running, then the VM stops: they replicate after it stops.
    cluster.cli("vm", "start", "off1", host=PRIMARY)
    pair.write("off1", 0, 0x6B, "3M", "1M")
    cluster.cli("vm", "stop", "off1", "--force", host=PRIMARY)
    cluster.cli("replication", "sync", "off1", host=PRIMARY)
    assert pair.equal("off1", 0)


def test_enable_refusals_leave_nothing_behind(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "db", "--disk", "32M", "--disk", "16M", host=PRIMARY)
    bad = {
        ("--recovery-history", "25"): (2, "0<=x<=24"),
        ("--snapshot-frequency", "2"): (2, "needs --recovery-history above 0"),
        ("--exclude-disk", "/nonexistent.qcow2"): (2, "not a disk of VM db"),
        ("--frequency", "60"): (2, "'60' is not one of"),
        ("--encrypt", "true"): (2, "--encrypt is for Kerberos"),
    }
    for extra, (code, text) in bad.items():
        result = cluster.cli("replication", "enable", "db", "--replica-server", REPLICA, "--replica-port",
                             str(pair.port), *extra, host=PRIMARY, check=False)  # fmt: skip
        assert result.returncode == code and text in result.stderr, (extra, result.stderr)
    disks = pair.json("vm", "get", "db")[0]["disks"]
    every = [x for d in disks for x in ("--exclude-disk", d)]
    none_left = cluster.cli("replication", "enable", "db", "--replica-server", REPLICA, "--replica-port",
                            str(pair.port), *every, host=PRIMARY, check=False)  # fmt: skip
    assert none_left.returncode == 2 and "no disk left" in none_left.stderr
    # Not authorized (vmhost3 has no entry) and unreachable: nothing on either host.
    cluster.cli("vm", "new", "db", "--disk", "32M", host="vmhost3")
    refused = cluster.cli("replication", "enable", "db", "--replica-server", REPLICA, "--replica-port",
                          str(pair.port), host="vmhost3", check=False)  # fmt: skip
    assert refused.returncode == 5 and "not authorized" in refused.stderr
    unreachable = cluster.cli("replication", "enable", "db", "--replica-server", REPLICA, "--replica-port",
                              str(cluster.hosts["vmhost3"].replica_port), host=PRIMARY, check=False)  # fmt: skip
    assert unreachable.returncode == 6 and "unreachable" in unreachable.stderr
    for host in (PRIMARY, "vmhost3"):
        assert pair.json("replication", "get", host=host) == []
    assert pair.json("replication", "get", host=REPLICA) == []
    assert [v["name"] for v in pair.json("vm", "list", host=REPLICA)] == []
    assert not (pair.storage / "db").exists()


def test_exclude_disk_and_settings_changes(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "web", "--disk", "32M", "--disk", "16M", host=PRIMARY)
    scratch = pair.json("vm", "get", "web")[0]["disks"][1]
    enabled = pair.enable("web", "--exclude-disk", scratch)
    assert enabled["replicated_disks"] == [pair.json("vm", "get", "web")[0]["disks"][0]]
    assert enabled["frequency_sec"] == 300 and enabled["recovery_history"] == 0
    assert enabled["compression_enabled"] is True
    assert len(pair.json("vm", "get", "web", host=REPLICA)[0]["disks"]) == 1
    pair.start("web")
    changed = pair.json("replication", "set", "web", "--frequency", "900", "--compression", "false",
                        "--recovery-history", "3")[0]  # fmt: skip
    assert (
        changed["frequency_sec"],
        changed["compression_enabled"],
        changed["recovery_history"],
    ) == (900, False, 3)
    cluster.cli("vm", "start", "web", host=PRIMARY)
    pair.write("web", 0, 0x42, "1M", "1M")
    cluster.cli("replication", "sync", "web", host=PRIMARY)
    assert pair.equal("web", 0)
    # The replica learnt the new history with that cycle.
    assert pair.replication("web", REPLICA)["recovery_history"] == 3
    filtered = pair.json("replication", "get", "--mode", "Primary", "--health", "Normal")
    assert [r["vm_name"] for r in filtered] == ["web"]
