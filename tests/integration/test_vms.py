"""VMs through the real CLI and agent: creation in three ways, start/stop, monitor, removal,
refusals of bad input, and VMs surviving agent restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import guest
from tests.localcluster import Cluster

GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def qemu_img_info(path: Path) -> str:
    return subprocess.run(
        ["qemu-img", "info", "-U", str(path)], capture_output=True, text=True, check=True
    ).stdout


def wait_for(predicate: object, timeout: float = 30.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_create_three_ways_and_remove(cluster: Cluster) -> None:
    existing = cluster.base / "existing.qcow2"
    parent = cluster.base / "parent.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(existing), "32M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(parent), "48M"], check=True)
    vm = cluster.cli_json(
        "vm",
        "new",
        "web1",
        "--memory",
        "128M",
        "--cpus",
        "2",
        "--disk",
        "64M",
        "--disk-path",
        str(existing),
        "--disk-parent",
        str(parent),
        host="vmhost1",
    )[0]
    assert vm["state"] == "Off" and vm["cpus"] == 2 and vm["memory_mb"] == 128
    assert vm["replication_state"] == "Disabled"
    disks = [Path(d) for d in vm["disks"]]
    assert disks[1] == existing
    assert "virtual size: 64 MiB" in qemu_img_info(disks[0])
    diff_info = qemu_img_info(disks[2])
    assert f"backing file: {parent}" in diff_info and "virtual size: 48 MiB" in diff_info
    again = cluster.cli_json("vm", "get", "web1", host="vmhost1")[0]
    assert again["id"] == vm["id"], "a VM keeps its UUID"

    cluster.cli("vm", "remove", "web1", host="vmhost1")
    assert cluster.cli_json("vm", "list", host="vmhost1") == []
    assert not disks[0].exists() and not disks[2].exists()
    assert existing.exists() and parent.exists(), "images given by path are the user's and stay"


def test_bad_input_changes_nothing(cluster: Cluster) -> None:
    cluster.cli("vm", "new", "db1", "--disk", "16M", host="vmhost1")
    before = cluster.cli_json("vm", "list", host="vmhost1")
    vms_dir = cluster.hosts["vmhost1"].state_dir / "vms"
    dirs_before = sorted(p.name for p in vms_dir.iterdir())
    cases = {
        ("vm", "new", "db1", "--disk", "16M"): (4, "already exists"),
        ("vm", "new", "a/b", "--disk", "16M"): (2, "path separator"),
        ("vm", "new", "..", "--disk", "16M"): (2, "invalid VM name"),
        ("vm", "new", "x1", "--disk", "12Q"): (2, "12Q"),
        ("vm", "new", "x2", "--disk", "16M", "--disk", "0"): (2, "invalid"),
        ("vm", "new", "x3", "--disk-parent", "/nonexistent/parent.qcow2"): (3, "no such image"),
        ("vm", "new", "x4", "--disk-path", "/nonexistent/disk.qcow2"): (3, "no such image"),
        ("vm", "new", "x5", "--memory", "lots"): (2, "lots"),
        ("vm", "new", "x6", "--kernel", "/nonexistent/vmlinuz"): (3, "no such file"),
        ("vm", "start", "nosuchvm"): (3, "no VM named"),
        ("vm", "stop", "db1"): (4, "not running"),
    }
    for args, (code, message) in cases.items():
        result = cluster.cli(*args, host="vmhost1", check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in one_line_error(result.stderr), (args, result.stderr)
    assert cluster.cli_json("vm", "list", host="vmhost1") == before
    assert sorted(p.name for p in vms_dir.iterdir()) == dirs_before

    cluster.cli("vm", "start", "db1", host="vmhost1")
    again = cluster.cli("vm", "start", "db1", host="vmhost1", check=False)
    assert again.returncode == 4 and "already running" in one_line_error(again.stderr)
    remove = cluster.cli("vm", "remove", "db1", host="vmhost1", check=False)
    assert remove.returncode == 4 and "--force" in one_line_error(remove.stderr)
    assert cluster.cli_json("vm", "get", "db1", host="vmhost1")[0]["state"] == "Running"
    cluster.cli("vm", "remove", "db1", "--force", host="vmhost1")
    assert cluster.cli_json("vm", "list", host="vmhost1") == []
    assert cluster.qemu_pids() == []


def test_monitor_writes_and_agent_restarts(cluster: Cluster) -> None:
    cluster.cli("vm", "new", "app", "--disk", "32M", host="vmhost2")
    cluster.cli("vm", "start", "app", host="vmhost2")
    pids = cluster.qemu_pids()
    assert len(pids) == 1
    out = cluster.cli(
        "vm", "monitor", "app", 'qemu-io disk0 "write -P 0xab 1M 64k"', host="vmhost2"
    ).stdout
    assert "wrote 65536/65536 bytes" in out
    ok = cluster.cli(
        "vm", "monitor", "app", 'qemu-io disk0 "read -P 0xab 1M 64k"', host="vmhost2"
    ).stdout
    assert "read 65536/65536 bytes" in ok and "Pattern verification failed" not in ok
    bad = cluster.cli(
        "vm", "monitor", "app", 'qemu-io disk0 "read -P 0xcd 1M 64k"', host="vmhost2"
    ).stdout
    assert "Pattern verification failed" in bad

    # A clean restart and a kill -9 of the agent: the VM runs on and is managed again.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        cluster.stop("vmhost2", sig)
        assert cluster.qemu_pids() == pids, "the VM outlives its agent"
        cluster.start("vmhost2")
        vm = cluster.cli_json("vm", "get", "app", host="vmhost2")[0]
        assert vm["state"] == "Running"
        ok = cluster.cli(
            "vm", "monitor", "app", 'qemu-io disk0 "read -P 0xab 1M 64k"', host="vmhost2"
        ).stdout
        assert "Pattern verification failed" not in ok and "read 65536/65536" in ok
    kinds = [e["kind"] for e in cluster.cli_json("event", "list", host="vmhost2")]
    assert kinds.count("vm-reattached") == 2

    # QEMU dies while the agent is down: the agent notices and records it.
    cluster.stop("vmhost2")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: cluster.qemu_pids() == [], what="QEMU to die")
    cluster.start("vmhost2")
    assert cluster.cli_json("vm", "get", "app", host="vmhost2")[0]["state"] == "Off"
    events = cluster.cli_json("event", "list", host="vmhost2")
    died = [e for e in events if e["kind"] == "vm-died"]
    assert (
        died
        and "ended while the agent was down" in died[-1]["message"]
        and died[-1]["level"] == "error"
    )

    # QEMU dies while the agent runs.
    cluster.cli("vm", "start", "app", host="vmhost2")
    for pid in cluster.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: cluster.cli_json("vm", "get", "app", host="vmhost2")[0]["state"] == "Off",
        what="the agent to notice QEMU died",
    )


def test_stop_without_guest_needs_force(cluster: Cluster) -> None:
    cluster.cli("vm", "new", "noos", "--disk", "16M", host="vmhost1")
    cluster.cli("vm", "start", "noos", host="vmhost1")
    refused = cluster.cli("vm", "stop", "noos", "--timeout", "2", host="vmhost1", check=False)
    assert refused.returncode == 4 and "use `vm stop --force`" in one_line_error(refused.stderr)
    assert cluster.cli_json("vm", "get", "noos", host="vmhost1")[0]["state"] == "Running"
    cluster.cli("vm", "stop", "noos", "--force", host="vmhost1")
    assert cluster.cli_json("vm", "get", "noos", host="vmhost1")[0]["state"] == "Off"
    assert cluster.qemu_pids() == []


@pytest.fixture(scope="module")
def assets() -> guest.GuestAssets:
    return guest.build_guest_assets(GUEST_CACHE)


def test_real_guest_acpi_stop_and_self_power_off(
    cluster: Cluster, assets: guest.GuestAssets
) -> None:
    disk = cluster.base / "data.qcow2"
    guest.make_data_disk(disk, 32)
    common = ["--memory", "256M", "--kernel", str(assets.kernel), "--initrd", str(assets.initrd)]
    cluster.cli(
        "vm",
        "new",
        "linux",
        "--disk-path",
        str(disk),
        *common,
        "--append",
        guest.kernel_cmdline(mode="write"),
        host="vmhost1",
    )
    cluster.cli("vm", "start", "linux", host="vmhost1")
    serial = next((cluster.hosts["vmhost1"].state_dir / "run").iterdir()) / "serial.log"
    wait_for(
        lambda: serial.exists() and "vmr: records: 50" in serial.read_text(errors="replace"),
        60,
        "the guest to write records",
    )
    cluster.cli("vm", "stop", "linux", "--timeout", "60", host="vmhost1")
    assert cluster.cli_json("vm", "get", "linux", host="vmhost1")[0]["state"] == "Off"
    report = guest.verify_records(disk)
    assert report.fsck_clean and report.count >= 50 and not report.errors, report

    # A guest that powers itself off is recorded as Off by the agent.
    disk2 = cluster.base / "data2.qcow2"
    guest.make_data_disk(disk2, 32)
    cluster.cli(
        "vm",
        "new",
        "batch",
        "--disk-path",
        str(disk2),
        *common,
        "--append",
        guest.kernel_cmdline(records=20),
        host="vmhost1",
    )
    cluster.cli("vm", "start", "batch", host="vmhost1")
    wait_for(
        lambda: cluster.cli_json("vm", "get", "batch", host="vmhost1")[0]["state"] == "Off",
        60,
        "the guest to power off",
    )
    events = [
        e for e in cluster.cli_json("event", "list", host="vmhost1") if e["vm_name"] == "batch"
    ]
    assert events[-1]["kind"] == "vm-off" and "the guest powered off" in events[-1]["message"]
    assert guest.verify_records(disk2).count == 20
