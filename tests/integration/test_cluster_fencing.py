"""Ownership, takeover and fencing on a real 3-member etcd, with nodes as real processes.

The nodes are `tests/cluster_node.py`: the agent's `cluster.member.Member` and a stand-in for
the replica's apply (numbered records in a shared directory, under the storage lock, the
ownership check after the lock). What is checked is the cluster part: who writes, when, and
that the record sequence has no gap and no repeat across a takeover.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.etcd_cluster import EtcdCluster
from vmreplica._internal.cluster import member
from vmreplica._internal.cluster.etcd import Etcd
from vmreplica._internal.cluster.fence import Fenced
from vmreplica.errors import NotFound

T = TypeVar("T")
TTL = 3
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Nodes:
    etcd: EtcdCluster
    shared: Path
    cluster: str = "replica"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        out = open(self.shared.parent / f"{name}.out", "ab")  # noqa: SIM115 (the child holds it)
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_node", "--etcd", self.etcd.endpoints_arg,
             *self.etcd.tls_args, "--cluster", self.cluster, "--node", name, "--ttl", str(TTL),
             "--shared", str(self.shared)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
        out.close()
        wait_for(lambda: self.events(name, "joined"), 20, f"{name} joined")

    def events(self, name: str, kind: str) -> list[dict[str, object]]:
        path = self.shared.parent / f"{name}.out"
        found = []
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event["event"] == kind:
                    found.append(event)
        return found

    def records(self, vm: str) -> list[tuple[str, int]]:
        path = self.shared / vm / "chain.log"
        if not path.exists():
            return []
        return [(n, int(s)) for n, s in (line.split() for line in path.read_text().splitlines())]

    def owners(self) -> dict[str, str]:
        return run(lambda e: member.owners(e, self.cluster), self.etcd)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


def run(fn: Callable[[Etcd], Awaitable[T]], etcd: EtcdCluster) -> T:
    async def go() -> T:
        client = etcd.client(timeout=1)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def lock_holder(path: Path) -> int | None:
    """The process holding a POSIX lock on `path`, from /proc/locks, or None."""
    st = path.stat()
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: POSIX ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
        if fields[1] == "POSIX" and fields[5] == file_id:  # a waiter's line has "->" there
            # The lock is taken in a worker thread, and /proc/locks names that thread.
            status = Path(f"/proc/{fields[4]}/status").read_text()
            return int(status.split("Tgid:", 1)[1].split()[0])
    return None


def contiguous(records: list[tuple[str, int]]) -> None:
    assert [s for _, s in records] == list(range(1, len(records) + 1)), records


@pytest.fixture
def nodes(etcd: EtcdCluster) -> Iterator[Nodes]:
    shared = etcd.base / "shared"
    shared.mkdir()
    n = Nodes(etcd, shared)

    async def init(e: Etcd) -> None:
        await member.create_cluster(e, n.cluster, {"name": n.cluster})
        await e.put(f"/vmreplica/{n.cluster}/vms/vm1", b"{}")

    run(init, etcd)
    try:
        yield n
    finally:
        n.close()


def owner_writing(nodes: Nodes) -> str:
    owner = wait_for(lambda: nodes.owners().get("vm1"), 20, "vm1 owned")
    wait_for(lambda: len(nodes.records("vm1")) >= 5, 20, "records written")
    return str(owner)


def test_kill_9_of_the_owner_another_node_takes_over_within_the_lease(nodes: Nodes) -> None:
    for name in ("n1", "n2", "n3"):
        nodes.start(name)
    owner = owner_writing(nodes)
    nodes.procs[owner].kill()
    killed = time.time()
    took = wait_for(
        lambda: [e for n in nodes.procs if n != owner for e in nodes.events(n, "took")],
        TTL * 4, "a takeover",
    )  # fmt: skip
    # etcd expires the lease TTL s after the last keepalive (sent every TTL/6); the placement
    # loop runs every TTL/4 plus jitter.
    assert float(took[0]["time"]) - killed < TTL + TTL / 4 + 1.5
    new = str(took[0]["node"])
    wait_for(lambda: nodes.records("vm1")[-1][0] == new, 10, "the new owner writing")
    count = len(nodes.records("vm1"))
    wait_for(lambda: len(nodes.records("vm1")) > count + 5, 10, "writing goes on")
    contiguous(nodes.records("vm1"))
    assert len(took) == 1, took


def test_a_paused_owner_whose_lease_expired_never_writes_again(nodes: Nodes) -> None:
    nodes.start("n1")
    nodes.start("n2")
    owner = owner_writing(nodes)
    other = "n2" if owner == "n1" else "n1"
    paused = nodes.procs[owner].pid
    os.kill(paused, signal.SIGSTOP)
    wait_for(lambda: nodes.events(other, "took"), TTL * 4, "takeover by the other node")
    if lock_holder(nodes.shared / "vm1" / "chain.lock") == paused:
        # Frozen inside its write: the storage lock makes the new owner wait for that write
        # (docs/CLUSTER.md, "At the storage"), so nothing new is written until it resumes.
        count = len(nodes.records("vm1"))
        time.sleep(TTL)
        assert len(nodes.records("vm1")) == count, "a write while the old owner held the lock"
        os.kill(paused, signal.SIGCONT)
        wait_for(lambda: nodes.records("vm1")[-1][0] == other, 20, "the new owner writing")
    else:
        wait_for(lambda: nodes.records("vm1")[-1][0] == other, 20, "the new owner writing")
        os.kill(paused, signal.SIGCONT)
    wait_for(lambda: nodes.events(owner, "fenced"), TTL * 2, "the resumed node fenced")
    time.sleep(1)
    records = nodes.records("vm1")
    first_new = next(i for i, (n, _) in enumerate(records) if n == other)
    assert all(n == other for n, _ in records[first_new:]), records
    contiguous(records)
    assert nodes.owners()["vm1"] == other


def test_etcd_member_losses(nodes: Nodes) -> None:
    """One member down: nothing changes. Two: the owner pauses (docs/CLUSTER.md), nobody takes
    over. Both back: the same owner resumes by itself, the records have no gap."""
    nodes.start("n1")
    nodes.start("n2")
    owner = owner_writing(nodes)
    etcd = nodes.etcd
    etcd.kill(etcd.members[0])
    count = len(nodes.records("vm1"))
    time.sleep(TTL * 1.5)
    assert len(nodes.records("vm1")) > count + 10
    assert nodes.owners()["vm1"] == owner

    etcd.kill(etcd.members[1])
    wait_for(lambda: nodes.events(owner, "fenced"), TTL * 2, "the owner paused")
    paused = len(nodes.records("vm1"))
    time.sleep(TTL * 2)
    assert len(nodes.records("vm1")) == paused, "a node wrote without a quorum"

    etcd.start(etcd.members[0])
    etcd.start(etcd.members[1])
    etcd.wait_healthy()
    wait_for(lambda: len(nodes.records("vm1")) > paused + 5, TTL * 4, "writing resumed")
    assert nodes.owners()["vm1"] == owner
    assert all(n == owner for n, _ in nodes.records("vm1"))
    contiguous(nodes.records("vm1"))
    assert not [e for n in nodes.procs for e in nodes.events(n, "took") if n != owner]


def test_a_planned_move_hands_the_vm_to_the_target_under_its_lease(etcd: EtcdCluster) -> None:
    async def scenario(e: Etcd) -> None:
        await member.create_cluster(e, "c", {"name": "c"})
        n1 = member.Member(e, "c", "n1", lambda: "", 10)  # no keepalive loop: a long lease
        n2 = member.Member(e, "c", "n2", lambda: "", 10)
        await n1.join()
        await n2.join()
        await n1.adopt("vm1", Path("/nonexistent"))
        with pytest.raises(Fenced, match="owned by node n1"):
            await n2.adopt("vm1", Path("/nonexistent"))
        with pytest.raises(Fenced, match="does not own VM vm1"):
            await n2.move("vm1", "n1")
        with pytest.raises(NotFound, match="node n9 is not a live member"):
            await n1.move("vm1", "n9")
        await n1.move("vm1", "n2")
        with pytest.raises(Fenced, match="does not own VM vm1"):
            n1.check("vm1", "apply a delta")
        await n2.refresh()
        n2.check("vm1", "apply a delta")
        assert await n1.owner("vm1") == "n2"
        # Bound to n2's lease: n2 leaving frees it at once.
        await n2.stop()
        assert await n1.owner("vm1") is None
        await n1.stop()

    run(scenario, etcd)
