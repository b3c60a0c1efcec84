"""The same replication over Kerberos and over certificates, in one run: the initial copy of a
VM that is off (bench_initial.py's random-data disk) and one delta cycle of --change-mib of
scattered random writes (bench_cycle.py's change), against a real MIT KDC (tests/kdc.py).

Run: ``.venv/bin/python bench/bench_kerberos.py [--quick] [--repeat 3] [--change-mib 64]``.

Both paths move the initial copy with ``qemu-img convert`` over NBD with TLS: certificates
(``tls-creds-x509``) on one, a pre-shared key derived from the GSS session key
(``tls-creds-psk``) on the other. Every call of the replication protocol over Kerberos is two
HTTP requests (its SPNEGO exchange, then the call with its MIC), so the fixed cost per cycle is
shown as an empty cycle too. Timed: wall time of ``start-initial --wait`` and ``sync`` (CLI
start-up included); the replica is checked with ``qemu-img compare`` after each.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench_cycle import change
from bench_initial import Sizes, make_disk, phases
from benchlib import (
    PRIMARY,
    REPLICA,
    GiB,
    MiB,
    Pair,
    compare,
    exit_cleanly_on_sigterm,
    replication_pair,
    table,
    timed,
)

from tests.kdc import Realm, use_kerberos
from tests.localcluster import Cluster, free_port

# label: (--auth, extra enable options)
CASES = {
    "certificate": ("certificate", ()),
    "kerberos": ("kerberos", ()),
    "kerberos --encrypt": ("kerberos", ("--encrypt", "true")),
}


def kerberized(realm: Realm) -> Callable[[Cluster], None]:
    def configure(cluster: Cluster) -> None:
        for name, host in cluster.hosts.items():
            use_kerberos(host.config, realm.add_host(name), f"host/{name}@{realm.name}")

    return configure


def one_run(pair: Pair, case: str, port: int, n: int, source: Path, sizes: Sizes,
            change_mib: int, rng: random.Random) -> tuple[float, float, float, int]:  # fmt: skip
    auth, extra = CASES[case]
    vm = f"{auth[:4]}{'-enc' if extra else ''}-{n}"
    disk = pair.base / "disks" / f"{vm}.qcow2"
    shutil.copyfile(source, disk)
    pair.new_vm(vm, disk)
    pair.enable(vm, *extra, port=port, auth=auth)
    os.sync()
    initial = timed(lambda: pair.start_initial(vm))
    split = phases(pair, vm)
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs after the initial copy")
    empty = timed(lambda: pair.sync(vm))
    change(disk, sizes.disk, pair.base / "data", change_mib, rng)
    os.sync()
    cycle = timed(lambda: pair.sync(vm))
    size = int(pair.measure(vm)[0]["last_replication_size"])
    if not compare(disk, pair.tip(vm)):
        raise RuntimeError(f"{vm}: the replica differs after the cycle")
    for host in (PRIMARY, REPLICA):
        pair.cli("replication", "remove", vm, host=host)
        pair.cli("vm", "remove", vm, host=host)
    disk.unlink(missing_ok=True)
    shutil.rmtree(pair.storage / vm, ignore_errors=True)
    print(f"  {vm}: initial {initial:.2f} s (prepare, copy, finish: {split}), empty cycle "
          f"{empty:.2f} s, cycle {cycle:.2f} s", flush=True)  # fmt: skip
    return initial, empty, cycle, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB disk, 256 MiB allocated")
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--alloc-gib", type=float, default=2.0)
    ap.add_argument("--change-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case; the best is shown")
    args = ap.parse_args()
    sizes = Sizes(int(args.disk_gib * GiB), int(args.alloc_gib * GiB), 64 * MiB)
    if args.quick:
        sizes = Sizes(512 * MiB, 256 * MiB, 16 * MiB)
    exit_cleanly_on_sigterm()
    began = time.monotonic()
    print(
        f"Kerberos and certificates: {sizes.disk / GiB:g} GiB disk, {sizes.alloc / GiB:g} GiB "
        f"of random data; a cycle of {args.change_mib} MiB; {os.cpu_count()} CPUs", flush=True,
    )  # fmt: skip
    realm = Realm.start()
    for key, value in realm.env().items():
        if key.startswith("KRB5"):
            os.environ[key] = value
    try:
        with replication_pair(kerberized(realm)) as pair:
            kerberos_port = free_port()
            ports = {"certificate": pair.port, "kerberos": kerberos_port}
            pair.cli("server", "set", "--auth", "both", "--kerberos-port", str(kerberos_port),
                     host=REPLICA)  # fmt: skip
            (pair.base / "disks").mkdir()
            source = pair.base / "disks" / "source.qcow2"
            make_disk(source, "random", sizes)
            rng = random.Random(1)
            best: dict[str, list[float]] = {}
            sizes_sent: dict[str, int] = {}
            for n in range(args.repeat):
                for case in CASES:  # interleaved, so all see the same machine
                    initial, empty, cycle, size = one_run(
                        pair, case, ports[CASES[case][0]], n, source, sizes, args.change_mib, rng
                    )
                    old = best.get(case, [float("inf")] * 3)
                    best[case] = [
                        min(a, b) for a, b in zip(old, (initial, empty, cycle), strict=True)
                    ]
                    sizes_sent[case] = size
    finally:
        realm.stop()
    rows = []
    cert = best["certificate"]
    for case in CASES:
        initial, empty, cycle = best[case]
        rows.append([case, initial, sizes.alloc / MiB / initial, empty, cycle, sizes_sent[case],
                     initial / cert[0], empty / cert[1], cycle / cert[2]])  # fmt: skip
    table(["auth", "initial s", "initial MiB/s", "empty cycle s", "cycle s", "cycle bytes",
           "initial/cert", "empty/cert", "cycle/cert"], rows)  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
