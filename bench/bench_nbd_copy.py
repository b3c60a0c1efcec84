"""The initial copy's data path alone, piece by piece, next to ``qemu-img convert`` of the same
disk: where the time of ``bench_initial.py``'s copy phase goes.

Run: ``.venv/bin/python bench/bench_nbd_copy.py [--quick] [--repeat 3]``.

One qcow2 disk (4 GiB, 2 GiB of random data in 64 MiB pieces, warm in the page cache) is copied
nine ways, each timed after a ``sync`` (best of --repeat):

- ``convert``: ``qemu-img convert -O qcow2`` to a local file, page cache, no fsync (the
  baseline of bench_initial);
- ``convert+fsync``: the same, then an fsync of the copy;
- ``convert -t none``: the same with O_DIRECT writes (durable without a long fsync);
- ``nbd``: ``qemu-img convert -n -W -m 16 --target-is-zero`` into a qemu-storage-daemon NBD
  export on loopback TCP, target opened with O_DIRECT, no TLS;
- ``nbd+tls``: the same with TLS and authz-simple, through ``nbd_import`` (the daemon inherits
  a listening socket with TCP_NODELAY) and ``nbd_copy.convert``: exactly vmreplica's copy phase
  (AES-128-GCM, ``tls_creds.PRIORITY``);
- ``nbd+tls AES-256-GCM``: the same with GnuTLS's plain NORMAL priority, which picks AES-256-GCM
  for certificates (vmreplica before it set the priority);
- ``nbd+tls, Nagle on``: the same on a listening socket without TCP_NODELAY, as QEMU 7.2 makes
  its own (vmreplica before it passed the socket; three 40 ms delayed-ACK waits per copy);
- ``nbd+tls-psk``: the same with a pre-shared key instead of certificates (``tls-creds-psk``):
  the initial copy between hosts that authenticate with Kerberos;
- ``nbd+tls buffered``: the same with a page-cache target (why vmreplica uses O_DIRECT);
- ``nbd+tls, glibc defaults``: vmreplica's copy without ``BULK_ENV`` (why it sets it).

No agents, no CLI: the setup (daemon start, certificates) is outside the timings. Beside each
time, the CPU seconds of the processes that moved the data (qemu-img, and the daemon for the NBD
paths, from /proc), and their sum divided by the wall time: about 2 on this 2-core machine says
the copy is bound by the CPU, not by waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench_initial import Sizes, make_disk
from benchlib import (
    GiB,
    MiB,
    children_cpu,
    compare,
    exit_cleanly_on_sigterm,
    free_port,
    fsync_file,
    process_cpu,
    run,
    table,
    timed,
)

from vmreplica._internal import certs
from vmreplica._internal.config import TlsFiles
from vmreplica._internal.drivers.qemu import nbd_copy, nbd_import, tls_creds
from vmreplica._internal.drivers.qemu.qsd import start_storage_daemon
from vmreplica._internal.ports.hypervisor import NbdCredentials, NbdPsk

Run = tuple[float, float, float]  # wall seconds, CPU seconds of qemu-img, of the daemon


@dataclass(frozen=True)
class _NormalPriority(tls_creds.TlsCreds):
    """Client credentials with GnuTLS's NORMAL priority: AES-256-GCM for certificates."""

    @property
    def priority(self) -> str:
        return "NORMAL"


async def into_daemon(
    source: Path, target: Path, work: Path, *, tls: bool, direct: bool,
    env: Mapping[str, str] = nbd_copy.BULK_ENV, psk: bool = False, nodelay: bool = True,
    aes256: bool = False,
) -> Run:  # fmt: skip
    """Seconds and CPU of the copy of ``source`` into a new image served by a storage daemon."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(target), str(_virtual_size(source)))
    if not tls:
        daemon = await start_storage_daemon((target,), work / "run", direct=direct, env=env)
    try:
        if tls:
            server: NbdCredentials = TlsFiles(
                *(work / "replica" / f for f in ("ca.pem", "cert.pem", "key.pem"))
            )
            client: NbdCredentials = TlsFiles(
                *(work / "primary" / f for f in ("ca.pem", "cert.pem", "key.pem"))
            )
            identity = "CN=primary.bench"
            if psk:
                server = client = NbdPsk("vmr-bench", os.urandom(32))
                identity = "vmr-bench"
            server_dir = tls_creds.tls_creds(work / "run" / "tls", server, "server")
            client_dir = tls_creds.tls_creds(work / "client-tls", client, "client")
            if aes256:
                client_dir = _NormalPriority(client_dir.kind, client_dir.directory)
            with nbd_import.listen("127.0.0.1", None) as sock:  # as driver.open_import
                if not nodelay:  # QEMU 7.2's own listening socket
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
                port = sock.getsockname()[1]
                daemon = await start_storage_daemon(
                    (target,), work / "run", direct=direct, env=env,
                    args=nbd_import.server_args(server_dir, identity, sock.fileno()),
                    pass_fds=(sock.fileno(),),
                )  # fmt: skip
            exports = await nbd_import.export_nodes(daemon, ["disk0"])

            async def copy() -> None:
                await nbd_copy.convert(
                    nbd_copy.file_source([source]), 0, "127.0.0.1", port, exports[0], client_dir,
                    "replica.bench", env=env,
                )  # fmt: skip
        else:
            port = free_port()
            address = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
            await daemon.execute("nbd-server-start", {"addr": address})
            await daemon.execute(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "disk0", "name": "d", "writable": True},
            )

            async def copy() -> None:
                proc = await asyncio.create_subprocess_exec(
                    "qemu-img", "convert", "-n", "-W", "-m", "16", "--target-is-zero",
                    "-f", "qcow2", str(source), "--target-image-opts",
                    f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=d",
                    env=env,
                )  # fmt: skip
                if await proc.wait():
                    raise RuntimeError("qemu-img convert into NBD failed")

        before, daemon_before = children_cpu(), process_cpu(daemon.pid).own
        seconds = await _timed_async(copy)
        daemon_cpu = process_cpu(daemon.pid).own - daemon_before
        return seconds, children_cpu() - before, daemon_cpu
    finally:
        await daemon.stop()


async def _timed_async(fn: Callable[[], Awaitable[None]]) -> float:
    os.sync()
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def _virtual_size(image: Path) -> int:
    return int(
        json.loads(run("qemu-img", "info", "--output=json", str(image)).stdout)["virtual-size"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB disk, 256 MiB allocated")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sizes = Sizes(4 * GiB, 2 * GiB, 64 * MiB)
    if args.quick:
        sizes = Sizes(512 * MiB, 256 * MiB, 16 * MiB)
    exit_cleanly_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="rbench-nbd-", dir="/tmp"))
    try:
        certs.new_ca(work / "ca")
        certs.issue(work / "ca", ["primary.bench"], work / "primary")
        certs.issue(work / "ca", ["replica.bench"], work / "replica")
        source = work / "source.qcow2"
        make_disk(source, "random", sizes)
        out = work / "out.qcow2"
        glibc_defaults = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

        def local(*extra: str, sync: bool = False) -> Run:
            def copy() -> None:
                run("qemu-img", "convert", *extra, "-O", "qcow2", str(source), str(out))
                if sync:
                    fsync_file(out)

            before = children_cpu()
            seconds = timed(copy)
            out.unlink()
            return seconds, children_cpu() - before, 0.0

        def nbd(**how: object) -> Run:
            result = asyncio.run(into_daemon(source, out, work, **how))  # type: ignore[arg-type]
            if not compare(source, out):
                raise RuntimeError(f"copy {how} differs from the source")
            out.unlink()
            shutil.rmtree(work / "run", ignore_errors=True)
            return result

        cases: list[tuple[str, Callable[[], Run]]] = [
            ("convert", lambda: local()),
            ("convert+fsync", lambda: local(sync=True)),
            ("convert -t none", lambda: local("-t", "none")),
            ("nbd", lambda: nbd(tls=False, direct=True)),
            ("nbd+tls (vmreplica)", lambda: nbd(tls=True, direct=True)),
            ("nbd+tls AES-256-GCM", lambda: nbd(tls=True, direct=True, aes256=True)),
            (
                "nbd+tls, Nagle on (QEMU 7.2's socket)",
                lambda: nbd(tls=True, direct=True, nodelay=False),
            ),
            ("nbd+tls-psk (Kerberos hosts)", lambda: nbd(tls=True, direct=True, psk=True)),
            ("nbd+tls buffered", lambda: nbd(tls=True, direct=False)),
            ("nbd+tls, glibc defaults", lambda: nbd(tls=True, direct=True, env=glibc_defaults)),
        ]
        print(
            f"copy of {sizes.alloc / GiB:g} GiB of random data ({sizes.disk / GiB:g} GiB disk), "
            f"best of {args.repeat}; {os.cpu_count()} CPUs",
            flush=True,
        )
        results: dict[str, Run] = {}
        for name, case in cases:
            results[name] = min(case() for _ in range(args.repeat))
            print(f"  {name}: {results[name][0]:.2f} s", flush=True)
        base = results["convert"][0]
        table(
            ["path", "seconds", "MiB/s", "convert/this", "qemu-img CPU s", "daemon CPU s",
             "CPU/wall"],
            [[n, s, sizes.alloc / MiB / s, base / s, c, d, (c + d) / s]
             for n, (s, c, d) in results.items()],
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
