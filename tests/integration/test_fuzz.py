"""Property-based probing of real agents with hypothesis: every peer route's JSON body (and the
delta and boot-file streams) and every management method's arguments, built from the fields each
one reads plus hostile values (paths, huge numbers, wrong types, ids that are not UUIDs).

The properties, checked over the whole run: no request gets a 500 (an internal error), no path
changes outside each agent's state directory and the storage locations it was given, and every
agent still answers, and restarts, afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.peer_tools import mgmt_raw, tls_of, tree, vm_id
from tests.integration.replication_env import PRIMARY, REPLICA, Pair, make_pair
from tests.localcluster import Cluster
from vmreplica._internal.api.methods import build_methods
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import PeerAddress, PeerClient
from vmreplica.errors import VmrError

MARK = "vmrfuzz"
HOSTILE_PATHS = [
    f"../../{MARK}", "/", "/etc", "/etc/shadow", f"/tmp/{MARK}", "..", ".", f"a/../../{MARK}",
    "/proc/self/mem", "a\0b", f"/tmp/{MARK}/x/../../../etc", "~root", "C:\\Windows", "",
]  # fmt: skip
# Only names in every host's [resolve] table or names that are not host names: a name the agent
# would look up in DNS would send traffic off this machine.
SERVERS = ["vmhost1", "vmhost2", "vmhost3", "vmhost1\n", "", "*.x", "a..b", "../etc", "-x"]
VM_NAMES = ["app", "probe", MARK, "app\n", "", "..", "a/b", "x" * 101, " app"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=70000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(HOSTILE_PATHS),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _settings() -> st.SearchStrategy[Any]:
    fields = ("frequency_sec", "recovery_history", "snapshot_frequency_hour", "compression",
              "auto_resynchronize", "recovery_point_interval")  # fmt: skip
    good = st.fixed_dictionaries(
        {
            "frequency_sec": st.sampled_from([30, 300, 900, -5, 45]),
            "recovery_history": st.integers(-2, 30),
            "snapshot_frequency_hour": st.none() | st.integers(0, 13),
            "compression": st.booleans(),
            "auto_resynchronize": st.booleans(),
            "recovery_point_interval": st.integers(-1, 90000),
        }
    )
    return good | st.fixed_dictionaries({}, optional=dict.fromkeys(fields, values)) | values


SETTINGS = {
    "frequency_sec": 300, "recovery_history": 0, "snapshot_frequency_hour": None,
    "compression": True, "auto_resynchronize": False, "recovery_point_interval": 3600,
}  # fmt: skip


def _mutated(
    valid: dict[str, st.SearchStrategy[Any]], hostile: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with at most two of its fields replaced by hostile values."""
    keys = sorted(hostile)
    return st.tuples(
        st.fixed_dictionaries(valid), st.lists(st.sampled_from(keys), max_size=2, unique=True)
    ).flatmap(
        lambda drawn: st.fixed_dictionaries({k: hostile[k] for k in drawn[1]}).map(
            lambda over: {**drawn[0], **over}
        )
    )


def _body(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda known: st.dictionaries(st.text(max_size=8), values, max_size=2).map(
            lambda extra: {**extra, **known}
        )
    )


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Pair]:
    cluster = Cluster.create()
    try:
        cluster.start_all()
        pair = make_pair(cluster)
        port = cluster.hosts[PRIMARY].replica_port
        cluster.cli("server", "set", "--enabled", "true", "--auth", "certificate",
                    "--certificate-port", str(port), host=PRIMARY)  # fmt: skip
        cluster.cli("auth", "new", "--allowed-primary", REPLICA, "--storage-location",
                    str(cluster.base / "v2-replicas"), "--trust-group", "Production", host=PRIMARY)  # fmt: skip
        cluster.cli("vm", "new", "app", "--disk", "64M", host=PRIMARY)
        cluster.cli("vm", "start", "app", host=PRIMARY)
        pair.enable("app")
        pair.start("app")
        yield pair
    finally:
        cluster.close()


def _snapshot(cluster: Cluster) -> set[Path]:
    return tree(cluster.base)


def _allowed(cluster: Cluster) -> list[Path]:
    """Where agents may write: their state, their storage locations, and the test's own files."""
    roots = [cluster.base / "fuzz"]
    for name, host in cluster.hosts.items():
        roots += [host.state_dir, host.dir / "agent.log", host.dir / "ready"]
        for entry in cluster.cli_json("auth", "get", host=name):
            roots.append(Path(entry["replica_storage_location"]))
        default = cluster.cli_json("server", "get", host=name)[0]["default_storage_location"]
        if default:
            roots.append(Path(default))
    return roots


def _outside(changed: set[Path], roots: list[Path]) -> list[Path]:
    return sorted(
        path for path in changed if not any(path == r or r in path.parents for r in roots)
    )


def _no_mark_anywhere() -> list[Path]:
    found: list[Path] = []
    for place in (Path("/"), Path("/tmp"), Path("/etc"), Path("/var")):
        found += place.glob(f"*{MARK}*")
    return found


def _media(vm: str) -> dict[str, Any]:
    """A well-formed offline media manifest (transport/media.py) for ``vm``."""
    disk = {"index": 0, "virtual_size": 64 << 20, "file_size": 1 << 20, "blake3": "0" * 64}
    return {"format": "vmreplica-initial-media", "version": 1, "vm_id": vm, "vm_name": "app",
            "primary_server": PRIMARY, "created": "2026-11-30T00:00:00+00:00", "disks": [disk]}  # fmt: skip


def test_property_no_internal_error_no_escape_and_agents_survive(fuzzed: Pair) -> None:
    cluster = fuzzed.cluster
    real_id = vm_id(cluster, PRIMARY, "app")
    (cluster.base / "fuzz").mkdir()
    before = _snapshot(cluster)
    internal: list[str] = []

    ids = st.sampled_from([real_id, *HOSTILE_PATHS]) | st.uuids().map(str) | values
    names = st.sampled_from(VM_NAMES) | values
    ports = st.integers(-1, 70000) | values
    boot = (
        st.none() | st.fixed_dictionaries({"size": ports, "blake3": st.text(max_size=70)}) | values
    )
    # Each body is a valid one with up to two fields replaced by hostile values, so that most
    # requests get past the first check and reach the code behind it.
    escape_ids = st.sampled_from([f"../../{MARK}-x", f"/tmp/{MARK}", f"..{MARK}"])
    hostile_id = escape_ids | ids
    fresh = st.uuids().map(str)
    good_name = st.sampled_from(["probe", "probe2", "probe3"])
    good_settings = st.just(dict(SETTINGS))
    peer_bodies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        p.HELLO: _body({}),
        p.ENABLE: _mutated(
            {"vm_id": fresh | escape_ids, "vm_name": good_name, "cpus": st.just(1),
             "memory_mb": st.just(64), "disk_sizes": st.just([1 << 20]), "settings": good_settings,
             "replica_port": st.just(443), "primary_port": st.none(), "append": st.none()},
            {"vm_id": hostile_id, "vm_name": names, "cpus": ports, "memory_mb": ports,
             "disk_sizes": st.lists(st.integers(-5, 1 << 40), max_size=3) | values,
             "settings": _settings(), "replica_port": ports, "primary_port": ports,
             "append": values, "kernel": boot, "initrd": boot},
        ),
        p.STATUS: _mutated({"vm_id": st.just(real_id) | escape_ids, "settings": good_settings},
                           {"vm_id": hostile_id, "settings": _settings()}),
        p.INITIAL_OPEN: _mutated({"vm_id": st.just(real_id) | escape_ids, "required_bytes": st.just(0)},
                                 {"vm_id": hostile_id, "required_bytes": values}),
        p.INITIAL_CLOSE: _mutated({"vm_id": st.just(real_id) | escape_ids, "ok": st.just(False)},
                                  {"vm_id": hostile_id, "ok": values}),
        p.VM_STATE: _mutated({"vm_id": st.just(real_id) | escape_ids}, {"vm_id": hostile_id}),
        p.REVERSE: _mutated(
            {"vm_id": st.just(real_id) | escape_ids, "vm_name": st.just("app"),
             "new_primary_port": st.none(), "failback_extents": st.just(True)},
            {"vm_id": hostile_id, "vm_name": names, "new_primary_port": ports,
             "failback_extents": values},
        ),
        p.INITIAL_OFFLINE: _mutated(
            {"vm_id": st.just(real_id) | escape_ids, "media": st.just(_media(real_id))},
            {"vm_id": hostile_id, "media": values | st.builds(
                lambda key, value: {**_media(real_id), key: value},
                st.sampled_from(["vm_id", "vm_name", "disks", "format", "version"]), values)},
        ),
        p.RESYNC_HASHES: _mutated(
            {"vm_id": st.just(real_id) | escape_ids, "disk": st.just(0),
             "block_size": st.just(65536), "first_block": st.just(0), "count": st.just(4)},
            {"vm_id": hostile_id, "disk": ports, "block_size": ports, "first_block": ports,
             "count": ports},
        ),
    }  # fmt: skip
    peer_request = st.one_of(
        *[st.tuples(st.just(route), body.map(lambda b: json.dumps(b).encode()))
          for route, body in peer_bodies.items()],
        st.tuples(
            st.builds(lambda i, k: f"{p.BOOT_FILE}?vm_id={i}&kind={k}",
                      st.sampled_from([real_id, "../x", ""]), st.sampled_from(["kernel", "initrd", "../x"])),
            st.binary(max_size=600),
        ),
        st.tuples(st.sampled_from([f"{p.DELTA}?vm_id={real_id}", f"{p.DELTA}?vm_id=../x"]),
                  st.binary(max_size=600)),
    )  # fmt: skip

    async def send(sender: str, receiver: str, route: str, body: bytes) -> None:
        port = cluster.hosts[receiver].replica_port
        address = PeerAddress(receiver, "127.0.0.1", port)
        async with PeerClient(address, tls_of(cluster, sender), 30) as client:
            try:
                await client.call(route, data=body)
            except VmrError as e:
                if type(e) is VmrError:
                    internal.append(f"{sender}->{receiver} {route} {body[:200]!r}: {e.message}")
                assert "\n" not in e.message, e.message

    @settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(
        st.sampled_from([(PRIMARY, REPLICA), ("vmhost3", REPLICA), (REPLICA, PRIMARY)]),
        peer_request,
    )
    def peer(pair_of_hosts: tuple[str, str], request: tuple[str, bytes]) -> None:
        asyncio.run(send(*pair_of_hosts, *request))

    peer()

    # Only the method names matter here: the real methods run in the agents.
    nothing = SimpleNamespace(config=None, events=None)
    stub = SimpleNamespace(ctx=nothing, server=None, auth=None, vms=None, replication=None,
                           failover=None, primary=None, replica=None)  # fmt: skip
    methods = build_methods(cast(Any, stub))
    storages = (
        st.sampled_from(
            [str(cluster.base / "fuzz" / "s1"), str(cluster.base / "fuzz" / "s2"), *HOSTILE_PATHS]
        )
        | values
    )
    files = (
        st.sampled_from(
            ["/etc/shadow", "/etc/hostname", str(cluster.hosts[REPLICA].dir / "tls" / "key.pem")]
        )
        | values
    )
    keys: dict[str, st.SearchStrategy[Any]] = {
        "name": names, "vm": names, "memory": st.sampled_from(["64M", "1E", "-1", "0", "1.5G"]) | values,
        "cpus": ports, "disks": st.lists(st.fixed_dictionaries({}, optional={
            "size": st.sampled_from(["16M", "1E", "0"]) | values, "path": files | st.sampled_from(HOSTILE_PATHS),
            "parent": files}), max_size=2) | values,
        "kernel": files, "initrd": files, "append": values, "force": values, "timeout": values,
        "delete_storage": values, "command": st.sampled_from(
            ["info status", 'qemu-io disk0 "read 0 4k"', 'migrate "exec:touch /tmp/vmrfuzz"',
             f"dump-guest-memory /tmp/{MARK}", "quit"]) | values,
        "since": values, "replica_server": st.sampled_from(SERVERS), "replica_port": ports,
        "auth": st.sampled_from(["certificate", "kerberos", "both", "x"]) | values,
        "enabled": values, "kerberos_port": ports, "certificate_port": ports, "any_server": values,
        "storage_location": storages, "certificate": files, "key": files, "ca": files,
        "monitoring_interval": values, "monitoring_start_time": values,
        "allowed_primary": st.sampled_from(["vmhost9", "*.example", "vmhost2\n", "a*.b"]) | values,
        "trust_group": st.sampled_from(["G", "G\n", ""]) | values, "frequency": ports,
        "recovery_history": ports, "snapshot_frequency": ports, "compression": values,
        "auto_resynchronize": values, "recovery_point_interval": ports, "exclude_disks": values,
        "as_replica": values, "reverse": st.just(False) | values, "state": values, "health": values,
        "mode": values, "resynchronize": values, "prepare": values, "as_test": values,
        "recovery_point": values,
    }  # fmt: skip
    # Methods that would take down what the other examples probe, or run for minutes, get only
    # arguments they refuse (a VM that does not exist); the rest get anything.
    refused_only = {"vm.remove", "replication.remove", "failover.complete"}
    missing = st.fixed_dictionaries({"vm": st.just(MARK), "name": st.just(MARK)})
    mgmt_request = st.one_of(
        *[st.tuples(st.just(m), missing if m in refused_only else _body(keys)) for m in methods]
    )

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from([PRIMARY, REPLICA]), mgmt_request)
    def mgmt(host: str, request: tuple[str, dict[str, Any]]) -> None:
        method, args = request
        status, answer = mgmt_raw(cluster, host, method, json.dumps(args).encode())
        if status == 500:
            internal.append(f"{host} {method} {args!r}: {answer}")
        if status >= 400:
            assert "\n" not in answer["error"]["message"], answer

    mgmt()

    assert internal == [], "\n".join(internal[:20])
    changed = _snapshot(cluster) ^ before
    assert _outside(changed, _allowed(cluster)) == []
    assert _no_mark_anywhere() == []
    for name in cluster.hosts:
        assert cluster.cli_json("server", "get", host=name)
        cluster.stop(name)
        cluster.start(name)
        assert cluster.cli_json("vm", "list", host=name) is not None
