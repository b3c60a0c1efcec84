"""A cluster node without VMs, for the fencing tests: `python -m tests.cluster_node …`.

It joins with `cluster.member.Member` (the agent's own code) and, for each VM it owns, "applies"
a numbered record every 50 ms to `<shared>/<vm>/chain.log`, the way the replica applies deltas:
under the VM's storage lock, the ownership check after taking the lock, the sequence read from
the shared storage. Events go to stdout as JSON lines: `took`, `fenced`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from vmreplica._internal.cluster.etcd import Etcd, ssl_context
from vmreplica._internal.cluster.fence import Fenced
from vmreplica._internal.cluster.member import Member
from vmreplica._internal.cluster.storage_lock import exclusive


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


def apply_one(member: Member, shared: Path, vm: str) -> None:
    d = shared / vm
    d.mkdir(exist_ok=True)
    with exclusive(d / "chain.lock", timeout=60):
        member.check(vm, "apply a delta")
        seq_file = d / "sequence"
        seq = int(seq_file.read_text()) if seq_file.exists() else 0
        with open(d / "chain.log", "a") as f:
            f.write(f"{member.node} {seq + 1}\n")
            f.flush()
            os.fsync(f.fileno())
        tmp = d / "sequence.tmp"
        tmp.write_text(str(seq + 1))
        os.replace(tmp, seq_file)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--etcd", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--ttl", type=int, default=3)
    p.add_argument("--shared", type=Path, required=True)
    for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key"):  # https:// etcd (mutual TLS)
        p.add_argument(flag, type=Path)
    a = p.parse_args()

    async def took(vm: str) -> None:
        emit("took", node=a.node, vm=vm)

    async def fenced() -> None:
        emit("fenced", node=a.node)

    tls = None if a.etcd_ca is None else ssl_context(a.etcd_ca, a.etcd_cert, a.etcd_key)
    etcd = Etcd(a.etcd.split(","), timeout=1, ssl=tls)
    member = Member(etcd, a.cluster, a.node, lambda: "", a.ttl, on_acquired=took, on_fenced=fenced)
    await member.join()
    member.start()
    emit("joined", node=a.node, pid=os.getpid())
    while True:
        for vm in sorted(member.owned):
            try:
                await asyncio.to_thread(apply_one, member, a.shared, vm)
            except Fenced as e:
                emit("refused", node=a.node, vm=vm, message=e.message)
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
