"""A cluster's VM-level timings with real agents and real QEMU: a failed-over replica VM started
again after its node dies (HA), and `vm move` of a running primary VM between nodes.

Run: ``.venv/bin/python bench/bench_cluster_vm.py [--rounds 5]`` (as root; ~4 min).

Part 1, HA: vmhost1 and vmhost3 are nodes of replica cluster "r" (a real 3-member etcd, lease TTL
3 s) behind the broker name of tests/integration/test_cluster_ha.py; VM `app` on vmhost2
replicates to it, is failed over to the cluster and started there. Each round kills the owning
node (its agent with -9 and its QEMU processes: a power loss) and times until the other node owns
the VM and until it runs there; the dead node then starts again. Baseline, interleaved in the
same run: the lease TTL (the takeover cannot come before the lease expires) plus the same VM's
start by hand on its owner (`vm stop --force`, then a timed `vm start`).

Part 2, move: vmhost2 and vmhost3 are nodes of primary cluster "p" sharing the VM's disk, vmhost1
its replica (tests/integration/test_cluster_move.py). Each round moves the running VM to the other
node with `vm move --to NODE --force` (power off, last delta sent, ownership handed over, started
on the target), the CLI timed and the agent's own `seconds`/`handover_seconds` recorded. Baseline,
interleaved: `vm stop --force` + `vm start` of the VM on the node that owns it.

Timings include each CLI call's start-up; the HA times are polled through the CLI, so they are
late by up to one call and 0.25 s (about 0.5 s). Everything lives under this run's own directories
(/tmp/vmr*, /tmp/rbench-etcd-*), removed on exit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from benchlib import exit_cleanly_on_sigterm, table

from tests.etcd_cluster import EtcdCluster
from tests.integration.cluster_env import Env, owned
from tests.integration.replication_env import PRIMARY, REPLICA, wait_for
from tests.integration.test_cluster_ha import TTL, broker_cluster, kill_node, running
from tests.integration.test_cluster_move import A, B, primary_cluster
from tests.integration.test_cluster_redirect import OTHER
from tests.localcluster import Cluster


def ha_rounds(rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(to the takeover, to running again, baseline start by hand) seconds of each round."""
    etcd = EtcdCluster.create(prefix="rbench-etcd-")
    c = Cluster.create()
    try:
        etcd.start()
        etcd.wait_healthy()
        with broker_cluster(c, etcd):
            vm_id = str(c.cli_json("vm", "get", "app", host=PRIMARY)[0]["id"])
            c.cli("vm", "stop", "app", "--force", host=PRIMARY)
            c.cli("failover", "start", "app", "--force", host=REPLICA)
            c.cli("vm", "start", "app", host=REPLICA)
            taken, back, by_hand = [], [], []
            owner, other = REPLICA, OTHER
            for _ in range(rounds):
                c.cli("vm", "stop", "app", "--force", host=owner)
                started = time.monotonic()
                c.cli("vm", "start", "app", host=owner)
                by_hand.append(time.monotonic() - started)
                kill_node(c, owner)
                killed = time.monotonic()
                wait_for(lambda o=other: owned(c, o) == [vm_id], 60, "the takeover")  # type: ignore[misc]
                taken.append(time.monotonic() - killed)
                wait_for(lambda o=other: running(c, o), 90, "the VM running again")  # type: ignore[misc]
                back.append(time.monotonic() - killed)
                c.start(owner)
                time.sleep(TTL)
                owner, other = other, owner
            return taken, back, by_hand
    finally:
        c.close()
        etcd.close()
        shutil.rmtree(etcd.base, ignore_errors=True)


def move_rounds(rounds: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """(CLI, agent, agent to the handover, baseline stop+start) seconds of each round."""
    etcd = EtcdCluster.create(prefix="rbench-etcd-")
    c = Cluster.create()
    try:
        etcd.start()
        etcd.wait_healthy()
        env: Env = primary_cluster(c, etcd)
        cli, agent, handover, restart = [], [], [], []
        here, there = A, B
        for _ in range(rounds):
            started = time.monotonic()
            env.cli("vm", "stop", "app", "--force", host=here)
            env.cli("vm", "start", "app", host=here)
            restart.append(time.monotonic() - started)
            started = time.monotonic()
            out = env.move(there, here)
            cli.append(time.monotonic() - started)
            agent.append(float(out["seconds"]))
            handover.append(float(out["handover_seconds"]))
            here, there = there, here
        return cli, agent, handover, restart
    finally:
        c.close()
        etcd.close()
        shutil.rmtree(etcd.base, ignore_errors=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("ha", "move"), help="run one part")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    if args.only in (None, "ha"):
        taken, back, by_hand = ha_rounds(args.rounds)
        floor = TTL + statistics.median(by_hand)
        print(f"\nHA of a failed-over running VM, {args.rounds} node deaths, lease TTL {TTL} s")
        table(
            ["from kill -9 of the owning node", "median s (min-max)", "vs TTL + start by hand"],
            [
                ["the other node owns the VM", spread(taken), ""],
                ["the VM runs there", spread(back), f"{statistics.median(back) / floor:.2f}"],
                ["baseline: vm start by hand", spread(by_hand), ""],
            ],
        )
    if args.only in (None, "move"):
        cli, agent, handover, restart = move_rounds(args.rounds)
        print(f"\nvm move of a running primary VM, {args.rounds} moves, alternating nodes")
        base = statistics.median(restart)
        table(
            ["", "median s (min-max)", "vs stop+start"],
            [
                ["vm move --force (CLI)", spread(cli), f"{statistics.median(cli) / base:.2f}"],
                ["  in the agent", spread(agent), ""],
                ["  to the handover", spread(handover), ""],
                ["baseline: vm stop --force + vm start", spread(restart), "1.00"],
            ],
        )


if __name__ == "__main__":
    main()
