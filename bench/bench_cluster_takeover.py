"""Takeover time after a node's death: kill -9 of the node owning a VM, until another node owns
it (its `take` txn committed) and until it has written its first record.

Run: ``.venv/bin/python bench/bench_cluster_takeover.py [--runs 10] [--ttl 3]``.

A real 3-member etcd on loopback (`tests/etcd_cluster.py`, 50 ms heartbeat, 500 ms election),
and per run two fresh nodes of a fresh cluster: `tests/cluster_node.py`, the agent's own
`cluster.member.Member` with a stand-in for the replica's apply (a numbered record every 50 ms
under the VM's storage lock, ownership checked under it): etcd's part of a takeover alone.
Real agents are timed in bench_cluster_cycle.py (a cycle after a takeover) and bench_cluster_vm.py
(a failed-over VM started again). Each run checks that the records have no gap and no repeat
across the takeover.

Baseline in the same run: the lease TTL itself (etcd expires the lease TTL seconds after the
last keepalive it received; keepalives go every TTL/6), which bounds the takeover from below
give or take one keepalive interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.etcd_cluster import EtcdCluster  # noqa: E402


def events(out: Path, kind: str) -> list[dict[str, object]]:
    if not out.exists():
        return []
    found = []
    for line in out.read_text().splitlines():
        if line.startswith("{") and json.loads(line)["event"] == kind:
            found.append(json.loads(line))
    return found


def records(shared: Path) -> list[tuple[str, int]]:
    log = shared / "vm1" / "chain.log"
    if not log.exists():
        return []
    return [(n, int(s)) for n, s in (line.split() for line in log.read_text().splitlines())]


def wait(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def one_run(etcd: EtcdCluster, run: int, ttl: int) -> tuple[float, float]:
    import asyncio

    from vmreplica._internal.cluster import member

    name = f"bench{run}"
    work = etcd.base / name
    shared = work / "shared"
    shared.mkdir(parents=True)

    async def init() -> None:
        client = etcd.client(timeout=1)
        await member.create_cluster(client, name, {"name": name})
        await client.put(f"/vmreplica/{name}/vms/vm1", b"{}")
        await client.close()

    asyncio.run(init())
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    procs = {}
    for node in ("a", "b"):
        with open(work / f"{node}.out", "wb") as out:
            procs[node] = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster_node", "--etcd", etcd.endpoints_arg,
                 *etcd.tls_args, "--cluster", name, "--node", node, "--ttl", str(ttl),
                 "--shared", str(shared)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip
    try:
        wait(lambda: len(records(shared)) >= 10, 30)
        owner = records(shared)[-1][0]
        other = "b" if owner == "a" else "a"
        os.kill(procs[owner].pid, signal.SIGKILL)
        killed = time.time()
        wait(lambda: events(work / f"{other}.out", "took"), ttl * 5)
        took = float(events(work / f"{other}.out", "took")[0]["time"]) - killed  # type: ignore[arg-type]
        wait(lambda: records(shared)[-1][0] == other, 10)
        writing = time.time() - killed
        seqs = [s for _, s in records(shared)]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap or a repeat"
        return took, writing
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ttl", type=int, default=3)
    args = parser.parse_args()
    etcd = EtcdCluster.create(prefix="rbench-etcd-")
    try:
        etcd.start()
        etcd.wait_healthy()
        took, writing = [], []
        for run in range(args.runs):
            t, w = one_run(etcd, run, args.ttl)
            took.append(t)
            writing.append(w)
            print(f"run {run + 1}: owner taken {t:.2f} s, new owner writing {w:.2f} s", flush=True)
        print(f"\nlease TTL {args.ttl} s, {args.runs} runs, kill -9 of the owner to:")
        print(f"  takeover txn  median {statistics.median(took):.2f} s  max {max(took):.2f} s")
        print(
            f"  first write   median {statistics.median(writing):.2f} s  max {max(writing):.2f} s"
        )
    finally:
        etcd.close()
        shutil.rmtree(etcd.base, ignore_errors=True)


if __name__ == "__main__":
    main()
