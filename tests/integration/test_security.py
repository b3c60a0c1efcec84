"""The security and robustness defects, each reproduced on real agents as a hostile authorized
peer or a careless administrator would, and shown fixed. Tests that only probe share one
replicated pair (module scope); those that kill agents or change storage have a cluster each."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration import peer_tools as p
from tests.integration.peer_tools import (
    journal_rows,
    mgmt_raw,
    peer_call,
    send_delta,
    state_db,
    tls_of,
    vm_id,
)
from tests.integration.replication_env import (
    PRIMARY,
    REPLICA,
    Pair,
    died_by_sigkill,
    make_pair,
    replicated_vm,
    restart_with_faults,
    verified_equal,
    wait_for,
)
from tests.localcluster import Cluster, free_port
from vmreplica.errors import AccessDenied, IntegrityError, InvalidArgument

STRANGER = "vmhost3"  # authorized on both hosts, in trust group Other


def replica_sequence(pair: Pair, name: str = "app") -> int:
    with state_db(pair.cluster, REPLICA) as conn:
        row = conn.execute(
            "SELECT sequence FROM replications WHERE vm_id=?", (vm_id(pair.cluster, PRIMARY, name),)
        ).fetchone()
    return int(row["sequence"])


@pytest.fixture(scope="module")
def shared() -> Iterator[Pair]:
    """vmhost2 replicates VM app to vmhost1; both listen, and both authorize vmhost3 (trust
    group Other) as well as each other."""
    cluster = Cluster.create()
    try:
        cluster.start_all()
        pair = make_pair(cluster)
        cluster.cli("auth", "new", "--allowed-primary", STRANGER, "--storage-location",
                    str(cluster.base / "other"), "--trust-group", "Other", host=REPLICA)  # fmt: skip
        port = cluster.hosts[PRIMARY].replica_port
        cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                    "--certificate-port", str(port), host=PRIMARY)  # fmt: skip
        for peer, group in ((REPLICA, "Production"), (STRANGER, "Other")):
            cluster.cli("auth", "new", "--allowed-primary", peer, "--storage-location",
                        str(cluster.base / f"v2-{group}"), "--trust-group", group, host=PRIMARY)  # fmt: skip
        replicated_vm(pair)
        yield pair
    finally:
        cluster.close()


SETTINGS = {
    "frequency_sec": 300, "recovery_history": 0, "snapshot_frequency_hour": None,
    "compression": True, "auto_resynchronize": False, "recovery_point_interval": 3600,
}  # fmt: skip


def enable_body(**changes: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vm_id": str(uuid.uuid4()), "vm_name": "probe", "cpus": 1, "memory_mb": 64,
        "disk_sizes": [1 << 20], "settings": dict(SETTINGS), "replica_port": 443,
        "primary_port": None, "append": None, "kernel": None, "initrd": None,
    }  # fmt: skip
    body.update(changes)
    return body


# -- 1. a peer-supplied id never becomes a path ------------------------------------------------


def test_peer_vm_ids_must_be_canonical_uuids(shared: Pair) -> None:
    cluster, port = shared.cluster, shared.port
    storage_before = sorted(shared.storage.iterdir())
    hostile: list[object] = [
        "../../zz-x", "/etc", "/", "", "x" * 10000, "a\0b", 42, None,
        str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}",
    ]  # fmt: skip
    for bad in hostile:
        with pytest.raises(InvalidArgument, match="canonical UUID"):
            peer_call(cluster, STRANGER, REPLICA, port, p.ENABLE, enable_body(vm_id=bad))
        for route in (p.STATUS, p.INITIAL_OPEN, p.INITIAL_CLOSE, p.VM_STATE):
            with pytest.raises(InvalidArgument, match="canonical UUID"):
                peer_call(cluster, STRANGER, REPLICA, port, route, {"vm_id": bad, "ok": False})
        with pytest.raises(InvalidArgument, match="canonical UUID"):
            peer_call(cluster, STRANGER, REPLICA, port, p.REVERSE,
                      {"vm_id": bad, "vm_name": "x", "failback_extents": True})  # fmt: skip
        if isinstance(bad, str) and len(bad) < 200:
            with pytest.raises(InvalidArgument, match="canonical UUID"):
                peer_call(cluster, STRANGER, REPLICA, port, f"{p.DELTA}?vm_id={quote(bad)}", b"x")
    for place in (cluster.base / "zz", cluster.base.parent / "zz", cluster.base / "vmhost1" / "zz"):
        assert not place.exists()
    assert sorted(shared.storage.iterdir()) == storage_before
    assert [r["kind"] for r in journal_rows(cluster, REPLICA)] == []


# -- 2. a refused delta leaves nothing; one bad relationship never stops the agent ------------


def test_refused_delta_leaves_nothing_behind(shared: Pair, tmp_path: Path) -> None:
    cluster, vm = shared.cluster, vm_id(shared.cluster, PRIMARY, "app")
    sequence = replica_sequence(shared)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "disk0.qcow2").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(IntegrityError, match="not a readable qcow2"):
        send_delta(cluster, PRIMARY, shared.port, vm, garbage, sequence + 1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
                    str(foreign / "disk0.qcow2"), "64M"], check=True)  # fmt: skip
    with pytest.raises(IntegrityError, match="backing file"):
        send_delta(cluster, PRIMARY, shared.port, vm, foreign, sequence + 1)

    assert journal_rows(cluster, REPLICA) == []
    staging = shared.storage / "app" / "staging"
    assert not staging.exists() or not any(staging.rglob("*"))
    cluster.stop(REPLICA)
    cluster.start(REPLICA)  # before the fix: "staging/N/disk0.qcow2 is not a readable qcow2 image"
    shared.write("app", 0, 0x22, "2M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(shared)


def test_unrecoverable_replica_is_quarantined_and_the_agent_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app")
    replicated_vm(pair, "db")
    restart_with_faults(cluster, REPLICA, "replica.after_stage=kill")
    pair.write("app", 0, 0x21, "2M", "64k")
    assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    died_by_sigkill(cluster, REPLICA)
    staged = pair.storage / "app" / "staging" / "2" / "disk0.qcow2"
    kept = tmp_path / "disk0.qcow2"
    shutil.copy(staged, kept)
    staged.write_bytes(os.urandom(64 * 1024))  # the journaled delta can no longer be applied

    cluster.start(REPLICA)  # the agent starts, with app quarantined
    measured = pair.measure("app", REPLICA)
    assert measured["health"] == "Critical"
    assert any("takes no changes" in d for d in measured["health_details"]), measured
    pair.write("db", 0, 0x31, "3M", "64k")
    cluster.cli("replication", "sync", "db", host=PRIMARY)  # every other VM carries on
    verified_equal(pair, "db")
    refused = cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
    assert refused.returncode == 4 and "takes no changes" in refused.stderr, refused.stderr
    assert pair.measure("app")["health"] == "Critical"

    shutil.copy(kept, staged)  # the operator fixed the cause
    cluster.cli("replication", "resume", "app", host=REPLICA)
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair, "app")
    assert not any("takes no changes" in d for d in pair.measure("app", REPLICA)["health_details"])


# -- 3. every disk of the VM is in every delta --------------------------------------------------


def test_delta_must_carry_every_disk_at_its_size(shared: Pair, tmp_path: Path) -> None:
    cluster, vm = shared.cluster, vm_id(shared.cluster, PRIMARY, "app")
    sequence = replica_sequence(shared)
    delta = tmp_path / "delta"
    delta.mkdir()
    image = delta / "disk7.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 1M 64k", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    with pytest.raises(IntegrityError, match="every disk must be in it"):
        send_delta(cluster, PRIMARY, shared.port, vm, delta, sequence + 1)
    image.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(delta / "disk0.qcow2"), "32M"],
                   check=True)  # fmt: skip
    with pytest.raises(IntegrityError, match="the replica disk is"):
        send_delta(cluster, PRIMARY, shared.port, vm, delta, sequence + 1)
    assert replica_sequence(shared) == sequence
    assert journal_rows(cluster, REPLICA) == []


# -- 4. peer fields are checked like the management API's ---------------------------------------


def test_peer_fields_are_checked_like_management_input(shared: Pair) -> None:
    cluster, port, vm = shared.cluster, shared.port, vm_id(shared.cluster, PRIMARY, "app")
    for change in ({"frequency_sec": -5}, {"frequency_sec": "abc"}, {"frequency_sec": 45},
                   {"recovery_history": -1}, {"recovery_point_interval": 0},
                   {"snapshot_frequency_hour": 3}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            peer_call(cluster, PRIMARY, REPLICA, port, p.STATUS,
                      {"vm_id": vm, "settings": {**SETTINGS, **change}})  # fmt: skip
    assert shared.replication("app", REPLICA)["frequency_sec"] == 300
    bad_bodies: list[dict[str, Any]] = [
        {"cpus": 0}, {"memory_mb": -5}, {"settings": {**SETTINGS, "frequency_sec": "abc"}},
        {"settings": {**SETTINGS, "recovery_history": -1}}, {"vm_id": "1" * 10000},
        {"vm_id": "\0"}, {"vm_name": "probe\n"}, {"vm_name": "../etc"}, {"kernel": "/etc/shadow"},
        {"initrd": "/etc/shadow"}, {"disk_sizes": [-1]}, {"disk_sizes": []},
        {"replica_port": 0}, {"primary_port": "443"}, {"append": 5},
    ]  # fmt: skip
    for change in bad_bodies:
        with pytest.raises(InvalidArgument):
            peer_call(cluster, PRIMARY, REPLICA, port, p.ENABLE, enable_body(**change))
    assert "probe" not in [v["name"] for v in cluster.cli_json("vm", "list", host=REPLICA)]
    # The real relationship goes on, and the sender is told the truth.
    shared.write("app", 0, 0x44, "4M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(shared)


# -- 5. vm monitor is not a root shell ----------------------------------------------------------


def test_vm_monitor_runs_only_read_only_info(shared: Pair) -> None:
    cluster = shared.cluster
    marker = cluster.base / "monitor-was-here"
    for command in (f'migrate "exec:touch {marker}"', f"dump-guest-memory {marker}", "quit",
                    "system_reset", f"info status; migrate exec:touch {marker}", "stop"):  # fmt: skip
        refused = cluster.cli("vm", "monitor", "app", command, host=PRIMARY, check=False)
        assert refused.returncode == 5, (command, refused.stderr)
        assert "only read-only `info`" in refused.stderr
    assert not marker.exists()
    assert "running" in cluster.cli("vm", "monitor", "app", "info status", host=PRIMARY).stdout
    assert shared.json("vm", "get", "app")[0]["state"] == "Running"

    # A host without the test switch runs no qemu-io either.
    host = cluster.hosts[STRANGER]
    original = host.config.read_text()
    host.config.write_text(original.replace("allow_qemu_io = true\n", ""))
    cluster.stop(STRANGER)
    cluster.start(STRANGER)
    cluster.cli("vm", "new", "probe", "--disk", "16M", host=STRANGER)
    cluster.cli("vm", "start", "probe", host=STRANGER)
    try:
        io = cluster.cli("vm", "monitor", "probe", 'qemu-io disk0 "write 0 64k"', host=STRANGER,
                         check=False)  # fmt: skip
        assert io.returncode == 5 and "allow_qemu_io" in io.stderr, io.stderr
        assert (
            "running" in cluster.cli("vm", "monitor", "probe", "info status", host=STRANGER).stdout
        )
    finally:
        cluster.cli("vm", "remove", "probe", "--force", host=STRANGER)
        host.config.write_text(original)


# -- 6. a refused listener change keeps the listener ------------------------------------------


def test_refused_server_set_keeps_the_listener(shared: Pair) -> None:
    cluster = shared.cluster
    port = cluster.hosts[STRANGER].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=STRANGER)  # fmt: skip
    cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
                str(cluster.base / "v3"), "--trust-group", "Production", host=STRANGER)  # fmt: skip

    def answers(at: int) -> bool:
        test = cluster.cli("replication", "test-connection", "--replica-server", STRANGER,
                           "--replica-port", str(at), "--auth", "certificate", "-o", "json",
                           host=PRIMARY, check=False)  # fmt: skip
        return bool(test.json()[0]["authorized"])

    assert answers(port)
    with socket.create_server(("0.0.0.0", 0)) as busy:
        taken = busy.getsockname()[1]
        refused = cluster.cli("server", "set", "--certificate-port", str(taken), host=STRANGER,
                              check=False)  # fmt: skip
        assert refused.returncode == 6 and "cannot open the certificate listener" in refused.stderr
    assert (
        cluster.cli_json("server", "get", host=STRANGER)[0]["certificate_authentication_port"]
        == port
    )
    assert answers(port), "the listener stayed open on its port"
    bad_key = cluster.cli("server", "set", "--certificate", "/etc/hostname", "--key", "/etc/hostname",
                          "--ca", "/etc/hostname", host=STRANGER, check=False)  # fmt: skip
    assert bad_key.returncode == 2, bad_key.stderr
    assert answers(port)
    moved = free_port()
    cluster.cli("server", "set", "--certificate-port", str(moved), host=STRANGER)
    assert answers(moved) and not answers(port)
    cluster.cli("server", "set", "--enabled", "false", host=STRANGER)


# -- 7. replica images are private whatever the storage location's mode ----------------------


def test_replica_files_are_private(cluster: Cluster) -> None:
    storage = cluster.base / "replica-storage"
    storage.mkdir(mode=0o755)
    os.chmod(storage, 0o755)  # a location an administrator made, readable by everyone
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "2", "--recovery-point-interval", "1")
    time.sleep(1.1)
    pair.write("app", 0, 0x71, "7M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    assert [p for p in cluster.cli_json("recovery-point", "list", "app", host=REPLICA)
            if p["id"] != "Latest"], "a recovery point was made"  # fmt: skip
    leaky = [
        f"{path} {stat.filemode(path.stat().st_mode)}"
        for root in (storage / "app", cluster.hosts[PRIMARY].state_dir, cluster.hosts[REPLICA].state_dir)
        for path in [root, *root.rglob("*")]
        if not path.is_symlink() and not path.is_socket() and path.stat().st_mode & 0o077
    ]  # fmt: skip
    assert leaky == []
    kinds = [e["kind"] for e in cluster.cli_json("event", "list", host=REPLICA)]
    assert "storage-location-shared" in kinds


# -- 8. management input ----------------------------------------------------------------------


def test_management_input_is_refused_before_anything_changes(shared: Pair) -> None:
    cluster = shared.cluster
    vms_before = cluster.cli_json("vm", "list", host=REPLICA)
    auth_before = cluster.cli_json("auth", "get", host=REPLICA)
    (cluster.base / "real").mkdir()
    (cluster.base / "link").symlink_to(cluster.base / "real")
    primary_disk = shared.primary_disk("app", 0)
    tip = shared.tip("app", 0)
    base = tip.with_name("base.qcow2")
    attempts: list[tuple[str, tuple[str, ...]]] = [
        (PRIMARY, ("vm", "new", "name\n", "--disk", "16M")),
        (REPLICA, ("auth", "new", "--allowed-primary", "vmhost9\n", "--storage-location",
                   str(cluster.base / "s9"), "--trust-group", "G")),
        (REPLICA, ("auth", "new", "--allowed-primary", "vmhost9", "--storage-location",
                   str(cluster.base / "s9"), "--trust-group", "G\n")),
        *[(REPLICA, ("auth", "new", "--allowed-primary", "vmhost9", "--storage-location", bad,
                     "--trust-group", "G")) for bad in ("/", "/etc", "/etc/vmr", "/tmp", str(cluster.base / "link"))],
        (REPLICA, ("server", "set", "--storage-location", "/usr/lib/x")),
        (PRIMARY, ("vm", "new", "twin", "--disk-path", str(primary_disk))),
        (REPLICA, ("vm", "new", "twin", "--disk-path", str(tip))),
        (REPLICA, ("vm", "new", "twin", "--disk-path", str(base))),
        (PRIMARY, ("vm", "new", "twin", "--disk", "16M", "--kernel", "/etc/shadow")),
        (PRIMARY, ("vm", "new", "twin", "--disk", "16M", "--kernel", "/etc/hostname", "--initrd", "/etc/shadow")),
        (PRIMARY, ("vm", "new", "twin", "--memory", "1E", "--disk", "16M")),
        (PRIMARY, ("vm", "new", "twin", "--cpus", "0", "--disk", "16M")),
    ]  # fmt: skip
    for host, args in attempts:
        refused = cluster.cli(*args, host=host, check=False)
        assert refused.returncode == 2, (args, refused.returncode, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
    assert cluster.cli_json("vm", "list", host=REPLICA) == vms_before
    assert cluster.cli_json("auth", "get", host=REPLICA) == auth_before
    assert "twin" not in [v["name"] for v in cluster.cli_json("vm", "list", host=PRIMARY)]
    assert not (cluster.base / "real").exists() or not any((cluster.base / "real").iterdir())


# -- 9 and 10. malformed and oversized bodies are one-line refusals ---------------------------


MALFORMED: dict[str, bytes] = {
    "invalid UTF-8": b'{"vm_id": "\xff\xfe"}',
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "5,000 digits": b'{"vm_id": ' + b"9" * 5000 + b"}",
    "over 2^63": b'{"required_bytes": 9223372036854775808, "vm_id": "x"}',
    "NaN": b'{"timeout": NaN, "vm_id": "x"}',
    "not JSON": b"hello",
    "a list": b"[1, 2]",
    "wrong types": b'{"vm_id": 5, "name": 5, "vm": 5, "settings": [], "ok": "yes", "enabled": "yes",'
    b' "allowed_primary": 5, "since": 5}',
}
JSON_ROUTES = (p.HELLO, p.ENABLE, p.STATUS, p.INITIAL_OPEN, p.INITIAL_CLOSE, p.VM_STATE, p.REVERSE)
METHODS = ("vm.get", "vm.new", "vm.stop", "vm.remove", "server.set", "auth.new", "auth.set",
           "replication.enable", "replication.set", "replication.get", "event.list",
           "failover.start", "recovery_point.list")  # fmt: skip


def test_malformed_bodies_are_refused_in_one_line(shared: Pair) -> None:
    cluster = shared.cluster
    for route in JSON_ROUTES:
        for what, body in MALFORMED.items():
            if route == p.HELLO and what == "wrong types":
                continue  # hello reads no field
            with pytest.raises(InvalidArgument) as refused:
                peer_call(cluster, PRIMARY, REPLICA, shared.port, route, body)
            assert "\n" not in refused.value.message, (route, what)
    for method in METHODS:
        for what, body in MALFORMED.items():
            status, answer = mgmt_raw(cluster, REPLICA, method, body)
            assert status == 400, (method, what, status, answer)
            assert answer["error"]["type"] == "InvalidArgument"
    for method, args in (("vm.new", b'{"name": "x", "cpus": 99999999999999999999}'),
                         ("replication.set", b'{"vm": "app", "recovery_point_interval": 9223372036854775807}'),
                         ("vm.stop", b'{"name": "app", "timeout": 1e999}')):  # fmt: skip
        status, answer = mgmt_raw(cluster, PRIMARY, method, args)
        assert status == 400, (method, answer)
    assert cluster.cli_json("vm", "get", "app", host=PRIMARY)[0]["state"] == "Running"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_json_bodies_are_limited_to_one_mib(shared: Pair) -> None:
    cluster = shared.cluster
    agent = cluster.hosts[REPLICA].process
    assert agent is not None
    before = _peak_rss(agent.pid)
    big = b'{"vm_id": "' + b"a" * (64 << 20) + b'"}'
    with pytest.raises(InvalidArgument, match="larger than"):
        peer_call(cluster, PRIMARY, REPLICA, shared.port, p.STATUS, big)
    status, answer = mgmt_raw(cluster, REPLICA, "vm.list", big)
    assert status == 400 and "larger than" in answer["error"]["message"]
    assert _peak_rss(agent.pid) - before < 16 << 20, "the agent buffered the body"
    assert cluster.cli_json("vm", "list", host=REPLICA)


# -- 11. vm-state answers only a peer with a relationship ---------------------------------------


def test_vm_state_needs_a_relationship(shared: Pair) -> None:
    cluster, vm = shared.cluster, vm_id(shared.cluster, PRIMARY, "app")
    port = cluster.hosts[PRIMARY].replica_port
    with pytest.raises(AccessDenied, match="no replication relationship"):
        peer_call(cluster, STRANGER, PRIMARY, port, p.VM_STATE, {"vm_id": vm})
    assert peer_call(cluster, REPLICA, PRIMARY, port, p.VM_STATE, {"vm_id": vm}) == {
        "state": "Running"
    }
    assert tls_of(cluster, REPLICA).cert.exists()


# -- 12 and 14. failed applies: no orphan, no phantom cycle -------------------------------------


def helpers_of(cluster: Cluster) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and str(cluster.base).encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def test_failed_applies_leave_no_orphan_and_count_once(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    # A qemu-img commit outlives its agent (stopped, so it cannot finish by itself).
    restart_with_faults(cluster, REPLICA, "qemu-img.commit=orphan")
    pair.write("app", 0, 0x41, "4M", "1M")
    assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    died_by_sigkill(cluster, REPLICA)
    wait_for(lambda: not helpers_of(cluster), 10, "the agent's qemu-img to die with it")
    cluster.start(REPLICA)
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)

    count = pair.measure("app", REPLICA)["successful_replication_count"]
    restart_with_faults(cluster, REPLICA, "replica.mid_apply=error")
    pair.write("app", 0, 0x51, "5M", "256k")
    for _ in range(3):
        assert cluster.cli("replication", "sync", "app", host=PRIMARY, check=False).returncode != 0
    assert len([r for r in journal_rows(cluster, REPLICA) if r["kind"] == "apply"]) <= 1
    cluster.stop(REPLICA)
    cluster.start(REPLICA)
    measured = pair.measure("app", REPLICA)
    assert measured["successful_replication_count"] == count + 1, "one delta, counted once"
    assert measured["last_replication_size"] > 0
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    verified_equal(pair)


# -- 13 and 14. recovery points: a failed step is finished in place; a time is its data's ------


def test_recovery_points_survive_failed_steps(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "3", "--recovery-point-interval", "1")

    def points() -> list[dict[str, Any]]:
        return [p for p in cluster.cli_json("recovery-point", "list", "app", host=REPLICA)
                if p["id"] != "Latest"]  # fmt: skip

    # The child creating the new tip is killed: the agent finishes the point at once.
    restart_with_faults(cluster, REPLICA, "qemu-img.create=kill-child-once")
    time.sleep(1.1)
    pair.write("app", 0, 0x61, "6M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)
    assert len(points()) == 1
    assert "recovered" in [e["kind"] for e in cluster.cli_json("event", "list", host=REPLICA)]
    time.sleep(1.1)
    pair.write("app", 0, 0x62, "6M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY)  # no restart needed
    assert len(points()) == 2
    verified_equal(pair)

    # A point finished by a restart keeps the time of its data, not of the restart.
    restart_with_faults(cluster, REPLICA, "replica.mid_freeze=kill")
    time.sleep(1.1)
    pair.write("app", 0, 0x63, "6M", "64k")
    cluster.cli("replication", "sync", "app", host=PRIMARY, check=False)
    died_by_sigkill(cluster, REPLICA)
    died = datetime.now(UTC)
    time.sleep(2.5)
    cluster.start(REPLICA)
    newest = datetime.fromisoformat(points()[-1]["creation_time"])
    assert len(points()) == 3
    assert newest <= died and died - newest < timedelta(seconds=30), (newest, died)
    verified_equal(pair)


# -- 15. the split-brain guard says why ----------------------------------------------------------


def test_split_brain_guard_refuses_unless_the_primary_is_unreachable(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app")  # vmhost2 has no listener: it cannot be asked
    refused = cluster.cli("failover", "start", "app", host=REPLICA, check=False)
    assert refused.returncode == 4 and "port is unknown" in refused.stderr, refused.stderr
    assert pair.replication("app", REPLICA)["state"] == "Replicating"

    port = cluster.hosts[PRIMARY].replica_port
    cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                "--certificate-port", str(port), host=PRIMARY)  # fmt: skip
    cluster.cli("auth", "new", "--allowed-primary", REPLICA, "--storage-location",
                str(cluster.base / "v2"), "--trust-group", "Production", host=PRIMARY)  # fmt: skip
    replicated_vm(pair, "db")
    running = cluster.cli("failover", "start", "db", host=REPLICA, check=False)
    assert running.returncode == 4 and "split brain" in running.stderr, running.stderr
    cluster.cli("vm", "stop", "db", "--force", host=PRIMARY)
    cluster.cli("auth", "remove", "--allowed-primary", REPLICA, host=PRIMARY)
    denied = cluster.cli("failover", "start", "db", host=REPLICA, check=False)
    assert denied.returncode == 4 and "not authorized" in denied.stderr, denied.stderr

    cluster.stop(PRIMARY)  # the disaster: now nothing answers
    cluster.cli("failover", "start", "db", host=REPLICA)
    started = [e["message"] for e in cluster.cli_json("event", "list", host=REPLICA)
               if e["kind"] == "failover-started"]  # fmt: skip
    assert "unreachable" in started[-1], started
    cluster.cli("failover", "start", "app", "--force", host=REPLICA)


# -- 16. a way back after remove ------------------------------------------------------------------


def test_replica_storage_can_be_deleted_and_replication_enabled_again(cluster: Cluster) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair)
    for host in (PRIMARY, REPLICA):
        cluster.cli("replication", "remove", "app", host=host)
    cluster.cli("vm", "remove", "app", host=REPLICA)  # the storage stays behind
    refused = cluster.cli("replication", "enable", "app", "--replica-server", REPLICA,
                          "--replica-port", str(pair.port), "--auth", "certificate", host=PRIMARY,
                          check=False)  # fmt: skip
    assert refused.returncode == 4 and "--delete-storage" in refused.stderr, refused.stderr
    shutil.rmtree(pair.storage / "app")
    pair.enable("app")
    pair.start("app")
    verified_equal(pair)

    for host in (PRIMARY, REPLICA):
        cluster.cli("replication", "remove", "app", host=host)
    unconfirmed = cluster.cli("vm", "remove", "app", "--delete-storage", host=REPLICA, check=False)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    not_replica = cluster.cli("vm", "remove", "app", "--delete-storage", "--yes", host=PRIMARY,
                              check=False)  # fmt: skip
    assert not_replica.returncode == 2 and "no replica storage" in not_replica.stderr
    cluster.cli("vm", "remove", "app", "--delete-storage", "--yes", host=REPLICA)
    assert not (pair.storage / "app").exists()
    pair.enable("app")
    pair.start("app")
    verified_equal(pair)
