"""Seeding from a copy already on the replica (enable --as-replica, start-initial --use-backup),
offline media (start-initial --destination, import-initial), stop-initial and a scheduled
start-initial, on real agents and QEMU. Every test ends with the replica equal to the primary."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.integration.peer_tools import TcpProxy
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    restart_with_faults,
    same_content,
    verified_equal,
    wait_for,
)
from tests.localcluster import Cluster

MiB = 1 << 20


def state(pair: Pair, host: str = PRIMARY, vm: str = "app") -> str:
    return str(pair.replication(vm, host)["state"])


def seed_copy(pair: Pair, vm: str, name: str) -> Path:
    """A copy of the (off) primary VM's disk, made where the replica storage is, by hand."""
    seeds = pair.cluster.base / "seeds"
    seeds.mkdir(exist_ok=True)
    copy = seeds / name
    shutil.copyfile(pair.primary_disk(vm, 0), copy)
    return copy


def test_seeding_from_a_copy_sends_only_what_differs(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x11, "0", "40M")
    cluster.cli("vm", "stop", "app", "--force", host=PRIMARY)
    copy = seed_copy(pair, "app", "app-seed.qcow2")
    # The copy travels to the replica site; meanwhile the primary changes 10% of what it holds.
    cluster.cli("vm", "start", "app", host=PRIMARY)
    for offset in ("0", "10M", "20M", "30M"):
        pair.write("app", 0, 0x22, offset, "1M")
    cluster.cli("vm", "new", "app", "--disk-path", str(copy), host=REPLICA)
    seeded = pair.json("replication", "enable", "app", "--as-replica", "--allowed-primary",
                       PRIMARY, host=REPLICA)[0]  # fmt: skip
    assert seeded["state"] == "WaitingForInitialReplication" and seeded["mode"] == "Replica"
    with TcpProxy(pair.port) as proxy:
        pair.json("replication", "enable", "app", "--replica-server", REPLICA, "--replica-port",
                  str(proxy.port), "--compression", "false")  # fmt: skip
        assert not copy.exists(), "the copy moved into the replica's chain, as its base"
        proxy.take_count()
        pair.cli("replication", "start-initial", "app", "--use-backup", "--wait", timeout=300)
        wire = proxy.take_count()
        assert state(pair) == "Replicating" and state(pair, REPLICA) == "Replicating"
        differing = 4 * MiB
        # The numbers go to the closing note: pytest -s shows them.
        print(f"\nseeding: {wire} bytes on the wire for {differing} differing of 40 MiB "
              f"allocated ({wire / differing:.2f} x differing, {wire / (40 * MiB):.3f} of "
              "the data)")  # fmt: skip
        assert differing <= wire <= 1.5 * differing, wire
        pair.cli("replication", "sync", "app")  # the first cycle after it may be applying now
        verified_equal(pair)
        events = [e["kind"] for e in pair.json("event", "list")]
        assert "initial-replication-done" in events
        # Replication goes on as after any initial replication.
        pair.write("app", 0, 0x33, "50M", "1M")
        pair.cli("replication", "sync", "app")
        verified_equal(pair)


def test_seeding_refusals_change_nothing(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "new", "other", "--disk", "32M", host=PRIMARY)
    other = seed_copy(pair, "other", "other.qcow2")
    # A copy of another size than the primary's disk.
    cluster.cli("vm", "new", "app", "--disk-path", str(other), host=REPLICA)
    pair.cli("replication", "enable", "app", "--as-replica", host=REPLICA)
    refused = pair.cli("replication", "enable", "app", "--replica-server", REPLICA,
                       "--replica-port", str(pair.port), check=False)  # fmt: skip
    assert refused.returncode != 0 and "cannot seed this replica" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert other.exists() and not (pair.storage / "app").exists()
    assert state(pair, REPLICA) == "WaitingForInitialReplication"
    assert pair.json("replication", "get", host=PRIMARY) == []
    pair.cli("replication", "remove", "app", host=REPLICA)
    cluster.cli("vm", "remove", "app", host=REPLICA)
    # A copy that waits for another primary.
    copy = seed_copy(pair, "app", "app.qcow2")
    cluster.cli("vm", "new", "app", "--disk-path", str(copy), host=REPLICA)
    pair.cli("replication", "enable", "app", "--as-replica", "--allowed-primary",
             "vmhost3", host=REPLICA)  # fmt: skip
    refused = pair.cli("replication", "enable", "app", "--replica-server", REPLICA,
                       "--replica-port", str(pair.port), check=False)  # fmt: skip
    assert refused.returncode != 0 and "replica of vmhost3" in refused.stderr, refused.stderr
    assert copy.exists() and not (pair.storage / "app").exists()
    # A running copy cannot be registered; --use-backup needs a copy on the replica.
    pair.cli("replication", "remove", "app", host=REPLICA)
    cluster.cli("vm", "new", "spare", "--disk", "16M", host=REPLICA)
    cluster.cli("vm", "start", "spare", host=REPLICA)
    running = pair.cli("replication", "enable", "spare", "--as-replica", host=REPLICA, check=False)
    assert running.returncode != 0 and "is running" in running.stderr
    cluster.cli("vm", "new", "plain", "--disk", "16M", host=PRIMARY)
    pair.enable("plain")
    nothing = pair.cli("replication", "start-initial", "plain", "--use-backup", "--wait",
                       check=False)  # fmt: skip
    assert nothing.returncode != 0 and "holds no copy to start from" in nothing.stderr, (
        nothing.stderr
    )
    wait_for(lambda: state(pair, vm="plain") != "Resynchronizing", 30, "the refusal to settle")
    assert state(pair, REPLICA, "plain") == "WaitingForInitialReplication"


def test_seeding_survives_a_crash_while_the_copy_moves(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x41, "0", "8M")
    cluster.cli("vm", "stop", "app", "--force", host=PRIMARY)
    copy = seed_copy(pair, "app", "app.qcow2")
    cluster.cli("vm", "new", "app", "--disk-path", str(copy), host=REPLICA)
    pair.cli("replication", "enable", "app", "--as-replica", host=REPLICA)
    restart_with_faults(cluster, REPLICA, "replica.after_seed_moved=kill")
    pair.cli("replication", "enable", "app", "--replica-server", REPLICA, "--replica-port",
             str(pair.port), check=False)  # fmt: skip
    died_by_sigkill(cluster, REPLICA)
    cluster.start(REPLICA)
    # Rolled back: the copy is where it was, and still waits as the seed.
    assert copy.exists() and not (pair.storage / "app").exists()
    assert pair.json("vm", "get", "app", host=REPLICA)[0]["disks"] == [str(copy)]
    assert state(pair, REPLICA) == "WaitingForInitialReplication"
    pair.enable("app")
    # Stopped halfway (held after its first batch), then started again: it ends equal.
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x42, "4M", "1M")
    restart_with_faults(cluster, PRIMARY, "primary.mid_resync=sleep:20")
    pair.cli("replication", "start-initial", "app", "--use-backup")
    wait_for(lambda: state(pair, REPLICA) == "Resynchronizing", 30, "the compare to start")
    stopped = pair.json("replication", "stop-initial", "app")[0]
    assert stopped["state"] == "ReadyForInitialReplication"
    assert state(pair, REPLICA) == "WaitingForInitialReplication"
    restart_with_faults(cluster, PRIMARY, "")
    pair.cli("replication", "start-initial", "app", "--use-backup", "--wait", timeout=300)
    assert state(pair) == "Replicating"
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def media_dir(cluster: Cluster, name: str) -> Path:
    directory = cluster.base / name
    directory.mkdir()
    return directory


def test_offline_media_queues_deltas_and_import_applies_them(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pair.write("app", 0, 0x51, "0", "8M")
    pair.enable("app")
    media = media_dir(cluster, "usb-disk")
    # The primary dies while writing the media: the restart writes it again, whole.
    restart_with_faults(cluster, PRIMARY, "primary.mid_media_export=kill")
    pair.cli("replication", "start-initial", "app", "--destination", str(media))
    died_by_sigkill(cluster, PRIMARY)
    assert not (media / "manifest.json").exists()
    cluster.start(PRIMARY)
    wait_for(lambda: state(pair) == "Replicating", 60, "the media to be written")
    assert state(pair) == "Replicating" and state(pair, REPLICA) == "WaitingForInitialReplication"
    manifest = json.loads((media / "manifest.json").read_text())
    assert manifest["vm_name"] == "app" and len(manifest["disks"]) == 1
    # Cycles start at once; the replica keeps their deltas.
    pair.write("app", 0, 0x52, "16M", "2M")
    pair.cli("replication", "sync", "app")
    pair.write("app", 0, 0x53, "4M", "1M")
    pair.cli("replication", "sync", "app")
    queued = sorted(p.name for p in (pair.storage / "app" / "queued").iterdir())
    assert queued == ["2", "3"], queued
    assert state(pair, REPLICA) == "WaitingForInitialReplication"
    # Damaged media, each refused with its reason, and nothing changes.
    chain = pair.tip("app", 0).parent
    before = sorted(p.name for p in chain.iterdir())
    bad: dict[str, tuple[str, Callable[[Path], None]]] = {
        "truncated": ("shorter than the manifest", lambda d: _truncate(d / "disk0.qcow2")),
        "corrupt": ("does not match its blake3", lambda d: _flip(d / "disk0.qcow2")),
        "unfinished": ("holds no manifest.json", lambda d: (d / "manifest.json").unlink()),
        "other-vm": ("not of app", lambda d: _other_vm(d / "manifest.json")),
        "other-size": ("holds disks of", lambda d: _other_size(d / "manifest.json")),
        # Hostile media: a FIFO blocked the import for ever (holding the replica lock), a
        # manifest that never ends was read whole into the agent's memory.
        "fifo": ("not a regular file", lambda d: _fifo(d / "disk0.qcow2")),
        "endless": ("not a regular file", lambda d: _link(d / "manifest.json", "/dev/zero")),
    }
    for name, (reason, damage) in bad.items():
        copy = cluster.base / f"media-{name}"
        shutil.copytree(media, copy)
        damage(copy)
        refused = pair.cli("replication", "import-initial", "app", "--path", str(copy),
                           host=REPLICA, check=False)  # fmt: skip
        assert refused.returncode != 0 and reason in refused.stderr, (name, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert sorted(p.name for p in chain.iterdir()) == before, name
        assert state(pair, REPLICA) == "WaitingForInitialReplication"
        assert not (pair.storage / "app" / "staging").exists() or not any(
            (pair.storage / "app" / "staging").iterdir()
        )
    # The replica dies right after the media became its base: the restart finishes the import.
    restart_with_faults(cluster, REPLICA, "replica.mid_media_import=kill")
    pair.cli("replication", "import-initial", "app", "--path", str(media), host=REPLICA,
             check=False)  # fmt: skip
    died_by_sigkill(cluster, REPLICA)
    cluster.start(REPLICA)
    wait_for(lambda: state(pair, REPLICA) == "Replicating", 60, "the import to finish")
    assert not (pair.storage / "app" / "queued").exists() or not any(
        (pair.storage / "app" / "queued").iterdir()
    )
    pair.cli("vm", "monitor", "app", 'qemu-io disk0 "flush"')
    pair.cli("replication", "sync", "app")
    verified_equal(pair)
    pair.write("app", 0, 0x54, "30M", "1M")
    pair.cli("replication", "sync", "app")
    verified_equal(pair)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 65536)


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _other_vm(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["vm_id"], data["vm_name"] = "00000000-0000-4000-8000-000000000001", "web"
    manifest.write_text(json.dumps(data))


def _other_size(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["disks"][0]["virtual_size"] *= 2
    manifest.write_text(json.dumps(data))


def test_scheduled_initial_replication_and_stop_initial(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
    pair.enable("app")
    for args in (["--use-backup", "--destination", str(cluster.base)],
                 ["--destination", str(cluster.base / "no-such-dir")]):  # fmt: skip
        refused = pair.cli("replication", "start-initial", "app", *args, check=False)
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
        assert state(pair) == "ReadyForInitialReplication"
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    scheduled = pair.json("replication", "start-initial", "app", "--start-time", later)[0]
    assert scheduled["state"] == "ReadyForInitialReplication"
    stopped = pair.json("replication", "stop-initial", "app")[0]
    assert stopped["state"] == "ReadyForInitialReplication"
    too_late = (datetime.now(UTC) + timedelta(days=8)).isoformat()
    refused = pair.cli("replication", "start-initial", "app", "--start-time", too_late,
                       check=False)  # fmt: skip
    assert refused.returncode != 0 and "at most 7 days ahead" in refused.stderr
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    pair.cli("replication", "start-initial", "app", "--start-time", soon)
    assert state(pair) == "ReadyForInitialReplication"
    wait_for(lambda: state(pair) == "Replicating", 60, "the scheduled initial replication")
    nothing = pair.cli("replication", "stop-initial", "app", check=False)
    assert nothing.returncode != 0 and "stop initial replication" in nothing.stderr
    pair.cli("replication", "sync", "app")
    assert same_content(pair.primary_disk("app", 0), pair.tip("app", 0))
    # A copy over the network, stopped while it is held: the replica's import is closed.
    cluster.cli("vm", "new", "web", "--disk", "64M", host=PRIMARY)
    pair.enable("web")
    restart_with_faults(cluster, PRIMARY, "primary.before_initial_copy=sleep:30")
    pair.cli("replication", "start-initial", "web")
    wait_for(
        lambda: "initial copy of web: serving" in cluster.hosts[REPLICA].log.read_text(),
        30,
        "the import",
    )
    stopped = pair.json("replication", "stop-initial", "web")[0]
    assert stopped["state"] == "ReadyForInitialReplication"
    assert state(pair, REPLICA, "web") == "WaitingForInitialReplication"
    staging = pair.storage / "web" / "staging"
    wait_for(lambda: not staging.exists() or not any(staging.iterdir()), 30, "the import closed")
    restart_with_faults(cluster, PRIMARY, "")
    pair.start("web")
    assert same_content(pair.primary_disk("web", 0), pair.tip("web", 0))
