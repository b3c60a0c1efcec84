"""Operator input the agent used to accept, ignore, or refuse only once it had started on it:
each is refused in one line with the exit status of a bad argument (2), and nothing changes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peer_tools import mgmt_raw
from tests.integration.replication_env import PRIMARY, REPLICA, Pair, make_pair
from tests.localcluster import Cluster


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """vmhost2's VM app, replication enabled to vmhost1 (no initial copy needed here)."""
    cluster = Cluster.create()
    try:
        cluster.start_all()
        pair = make_pair(cluster)
        cluster.cli("vm", "new", "app", "--disk", "16M", host=PRIMARY)
        pair.enable("app")
        yield pair
    finally:
        cluster.close()


def refused(pair: Pair, *args: str, reason: str) -> None:
    result = pair.cli(*args, check=False)
    assert result.returncode == 2, (args, result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert reason in lines[0], lines[0]


def test_replica_server_and_port_without_reverse_are_refused(pair: Pair) -> None:
    """`replication set VM --replica-port N` without --reverse answered with the relationship
    unchanged and exit 0, whatever N was (70000 too): the operator believed it changed."""
    before = pair.replication("app")
    for extra in (("--replica-port", "70000"), ("--replica-port", "1234"),
                  ("--replica-server", "vmhost3")):  # fmt: skip
        refused(pair, "replication", "set", "app", *extra, reason="go with --reverse")
    assert pair.replication("app") == before


def test_primary_options_with_as_replica_are_refused(pair: Pair) -> None:
    """`replication enable VM --as-replica --replica-port N` (or --frequency, --exclude-disk…)
    registered the seed and ignored the rest, exit 0."""
    pair.cli("vm", "new", "seedy", "--disk", "1M", host=REPLICA)
    for extra in (("--replica-port", "1"), ("--replica-server", "vmhost2"),
                  ("--frequency", "30"), ("--exclude-disk", "/x")):  # fmt: skip
        result = pair.cli("replication", "enable", "seedy", "--as-replica", *extra,
                          host=REPLICA, check=False)  # fmt: skip
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        assert "not with --as-replica" in result.stderr and result.stderr.count("\n") == 1
    unrelated = pair.cli("replication", "get", "seedy", host=REPLICA, check=False)
    assert unrelated.returncode == 3 and "not enabled" in unrelated.stderr  # nothing registered
    pair.cli("vm", "remove", "seedy", host=REPLICA)


def test_vm_disks_are_checked_before_anything_is_made(pair: Pair, tmp_path: Path) -> None:
    """A disk no replica could hold was made anyway (2P: qemu-img takes it, the replication
    protocol does not), or refused by qemu-img as a storage failure (exit 7) after the VM's
    record and directory were begun; a parent that is no image was a storage failure too."""
    vms = pair.json("vm", "list")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a disk image\n")
    refused(pair, "vm", "new", "big", "--disk", "2P", reason="at most 1P")
    refused(pair, "vm", "new", "big", "--disk", "99999999999999999999T", reason="at most 1P")
    refused(pair, "vm", "new", "big", "--disk-parent", str(not_image), reason="not a usable qcow2")
    many = [arg for _ in range(65) for arg in ("--disk", "1M")]
    refused(pair, "vm", "new", "big", *many, reason="at most 64 disks")
    assert pair.json("vm", "list") == vms
    vms_dir = pair.cluster.hosts[PRIMARY].state_dir / "vms"
    assert not (vms_dir / "big").exists()


def test_unknown_filters_and_bad_move_targets_are_refused_in_one_line(pair: Pair) -> None:
    """`replication get --state Nope` answered an empty list (exit 0), as if no relationship
    were in it; `vm move` printed its progress line before the refusal (two lines)."""
    refused(pair, "replication", "get", "--state", "Nope", reason="unknown --state 'Nope'")
    refused(pair, "replication", "get", "--state", "x" * 5000, reason="unknown --state")
    assert pair.json("replication", "get", "--state", "ReadyForInitialReplication")
    refused(pair, "vm", "move", "app", "--to", "..", reason="invalid node name")


def test_a_replica_chain_image_is_no_parent(pair: Pair) -> None:
    """`vm new clone --disk-parent <a replica's tip or point>` was accepted: the clone, once
    running, holds the image as its backing file, and every apply into the chain then failed
    ("Failed to get write lock"). Refused like --disk-path into replica storage."""
    chain = pair.storage / "app" / "disk0"
    vms = pair.json("vm", "list", host=REPLICA)
    for image in ("tip.qcow2", "base.qcow2"):
        result = pair.cli("vm", "new", "clone", "--disk-parent", str(chain / image),
                          host=REPLICA, check=False)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "is in replica storage" in result.stderr and result.stderr.count("\n") == 1
    assert pair.json("vm", "list", host=REPLICA) == vms


def test_a_lone_surrogate_is_refused_not_an_internal_error(pair: Pair) -> None:
    """JSON may escape a lone UTF-16 surrogate (\\ud800), which decodes to a string no UTF-8
    write takes: every method naming a VM by it answered 500, an internal error."""
    for method, body in (("vm.get", b'{"name": "\\ud800"}'),
                         ("replication.get", b'{"vm": "app\\udfff"}'),
                         ("auth.new", b'{"allowed_primary": "x.test", "storage_location": '
                                      b'"/srv/\\ud800", "trust_group": "G"}')):  # fmt: skip
        status, answer = mgmt_raw(pair.cluster, PRIMARY, method, body)
        assert status == 400, (method, status, answer)
        assert answer["error"]["type"] == "InvalidArgument", answer
        assert "surrogate" in answer["error"]["message"]
    status, answer = mgmt_raw(pair.cluster, PRIMARY, "vm.get", b'{"name": "app \\ud83d\\ude00"}')
    assert status == 404, answer  # a surrogate pair is one character: just no such VM


def test_a_relative_path_is_the_caller_s(pair: Pair, tmp_path: Path) -> None:
    """`vm new NAME --disk-path disk.qcow2` in the image's directory was read against the
    agent's working directory ("no such image /…/disk.qcow2"), as --kernel, --disk-parent and
    --exclude-disk were; --destination and --path were already the caller's."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "rel.qcow2"),
                    "4M"], check=True)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica", "vm", "new", "rel", "--disk-path", "rel.qcow2",
         "-o", "json"],
        capture_output=True, text=True, cwd=tmp_path, env=pair.cluster.env(PRIMARY), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["disks"] == [str(tmp_path / "rel.qcow2")]
    pair.cli("vm", "remove", "rel")
    assert (tmp_path / "rel.qcow2").exists()  # used in place: kept


def test_a_storage_location_is_no_place_the_agent_keeps_already(pair: Pair) -> None:
    """A storage location inside a replica VM's storage was accepted: `vm remove VM
    --delete-storage` of that VM would delete every replica kept there too. Inside the agent's
    state directory itself, a replica VM could take the name of one of the agent's own
    directories (run, vms); a directory of its own there is fine."""
    cluster = pair.cluster
    entries = pair.json("auth", "get", host=REPLICA)
    state = cluster.hosts[REPLICA].state_dir
    for place, reason in ((pair.storage / "app", "storage of replica VM app"),
                          (pair.storage / "app" / "deeper", "storage of replica VM app"),
                          (state, "state directory"), (state / "run" / "x", "state directory")):  # fmt: skip
        result = pair.cli("auth", "new", "--allowed-primary", "vmhost3", "--storage-location",
                          str(place), "--trust-group", "G", host=REPLICA, check=False)  # fmt: skip
        assert result.returncode == 2 and reason in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        result = pair.cli("server", "set", "--storage-location", str(place), host=REPLICA,
                          check=False)  # fmt: skip
        assert result.returncode == 2 and reason in result.stderr, result.stderr
    assert pair.json("auth", "get", host=REPLICA) == entries
    assert not (pair.storage / "app" / "deeper").exists() and not (state / "run" / "x").exists()
    pair.cli("server", "set", "--storage-location", str(state / "replicas"), host=REPLICA)


def test_a_vm_name_ending_with_a_space_is_refused(pair: Pair) -> None:
    """A name with a trailing space ("app ") was made beside "app": two VMs no listing tells apart."""
    refused(pair, "vm", "new", "app ", "--disk", "1M", reason="not ending with a space")
    names = [vm["name"] for vm in pair.json("vm", "list")]
    assert "app " not in names and "app" in names
