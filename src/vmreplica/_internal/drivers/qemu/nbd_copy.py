"""Initial copies over NBD: a point-in-time export of the source disks, a TLS import on the
replica, and ``qemu-img convert`` moving the data from one to the other.

Source (the VM's QEMU, or a storage daemon when the VM is off). Each disk gets a *fleecing*
overlay ``vmr-f{i}`` backed by the disk, and one QMP transaction both adds the tracking bitmap
and starts ``blockdev-backup sync=none`` into the overlays. From that instant every guest write
first saves the old clusters into the overlay, so the overlay reads as the disk did when tracking
began: the copy and the bitmap start at one instant, and the primary never writes a full copy of
the disk to its own storage. The overlays are exported read-only on a unix socket.

Replica: a qemu-storage-daemon serves the new images over NBD+TLS (nbd_import.py). Images are
opened with O_DIRECT where the file system has it: page-cache writes of a multi-GiB stream cost
the daemon twice the CPU (measured, see bench/README.md), and the data is not read again soon.

``qemu-img convert -n -W --target-is-zero`` reads only what is allocated (holes stay holes),
writes out of order with 16 requests in flight, and does the TLS in C: the data never passes
through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmreplica._internal.drivers.qemu import blockjobs, qemu_img, tracking
from vmreplica._internal.drivers.qemu.block_read import NbdView
from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.children import die_with_parent
from vmreplica._internal.drivers.qemu.qmp import QmpCommandError
from vmreplica._internal.drivers.qemu.tls_creds import TLS_ID, TlsCreds, kv
from vmreplica.errors import ConnectionFailed, StorageError, VmrError

__all__ = [
    "BULK_ENV",
    "Source",
    "clear_source",
    "close_source",
    "convert",
    "export_source",
    "file_source",
    "supports_direct_io",
]

FLEECE_PREFIX = "vmr-f"
_FLEECE_JOB = "vmr-fj"
EXPORT_PREFIX = "vmr-e"  # the block exports of both sides (nbd_import.py)
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
Progress = Callable[[float], None]
# For the processes that move the data. glibc serves buffers of 128 KiB and more with fresh
# mmaps, which the kernel zero-fills on first touch: one page fault per 4 KiB of every request.
# Keeping them on the heap made the copy 20% faster (2.4 s instead of 3.0 s for 2 GiB, measured).
BULK_ENV = {
    **os.environ,
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
}


@dataclass(frozen=True)
class Source:
    """What ``qemu-img`` reads: disk ``i`` is ``image_opts[i]`` (``--image-opts`` syntax); the
    same disk as an NBD client reads it is ``views[i]`` (block_hash.py)."""

    image_opts: tuple[str, ...]
    views: tuple[NbdView, ...]
    run_dir: Path | None = None  # of an export, which close_source() takes down


def file_source(disks: Sequence[Path]) -> Source:
    """The images themselves, for a VM that is off and stays off (its lock is held)."""
    return Source(
        tuple(
            f"driver=qcow2,file.driver=file,file.filename={kv(str(d.absolute()))}" for d in disks
        ),
        tuple(NbdView(image=d) for d in disks),
    )


def supports_direct_io(directory: Path) -> bool:
    """tmpfs and some other file systems refuse O_DIRECT; QEMU would then fail to open."""
    probe = directory / f".direct-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


# -- source side ---------------------------------------------------------------------------


async def clear_source(target: QmpTarget, run_dir: Path) -> None:
    """What a dead agent left in a QEMU that outlived it: exports, fleecing jobs and nodes."""
    exports = await target.execute("query-block-exports")
    for export in exports if isinstance(exports, list) else []:
        if str(export.get("id", "")).startswith(EXPORT_PREFIX):
            with contextlib.suppress(QmpCommandError):
                await target.execute("block-export-del", {"id": export["id"], "mode": "hard"})
    with contextlib.suppress(QmpCommandError):
        await target.execute("nbd-server-stop")
    jobs = await target.execute("query-block-jobs")
    stale = [
        blockjobs.Job(str(j.get("device")), Path(), str(j.get("device")), "")
        for j in (jobs if isinstance(jobs, list) else [])
        if str(j.get("device", "")).startswith(_FLEECE_JOB)
    ]
    if stale:
        with target.subscribe(blockjobs.END_EVENTS) as events:
            await asyncio.wait_for(blockjobs.cancel_jobs(target, events, stale), 60)
    nodes = await target.execute("query-named-block-nodes", {"flat": True})
    for node in nodes if isinstance(nodes, list) else []:
        name = str(node.get("node-name", ""))
        if re.fullmatch(rf"{FLEECE_PREFIX}\d+", name):
            await _delete_node(target, name)
    for leftover in run_dir.glob("fleece-*.qcow2"):
        leftover.unlink(missing_ok=True)


async def _delete_node(target: QmpTarget, name: str) -> None:
    # An export that is going away still holds its node for a moment.
    for _ in range(50):
        try:
            await target.execute("blockdev-del", {"node-name": name})
            return
        except QmpCommandError as exc:
            if "not found" in exc.desc.lower():
                return
            await asyncio.sleep(0.1)


async def export_source(
    target: QmpTarget, nodes: Sequence[str], run_dir: Path, bitmap: str | None
) -> Source:
    """Export each disk as it is now, and start tracking in ``bitmap`` at that same instant
    (None: tracking stays as it is)."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    await clear_source(target, run_dir)
    found = await blockjobs.block_nodes(target, nodes)
    fleeces = tuple(run_dir / f"fleece-{i}.qcow2" for i in range(len(nodes)))
    jobs = tuple(
        blockjobs.Job(node, fleece, f"{_FLEECE_JOB}{i}", f"{FLEECE_PREFIX}{i}")
        for i, (node, fleece) in enumerate(zip(nodes, fleeces, strict=True))
    )
    sock = run_dir / "nbd.sock"
    names = tuple(f"disk{i}" for i in range(len(nodes)))
    source = Source(
        tuple(f"driver=nbd,server.type=unix,server.path={kv(str(sock))},export={n}" for n in names),
        tuple(NbdView(socket=sock, export=n) for n in names),
        run_dir,
    )
    started = False
    try:
        for job in jobs:
            await qemu_img.create(job.dest, int(found[job.node]["image"]["virtual-size"]))
            file = {"driver": "file", "filename": str(job.dest)}
            await target.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": job.target_node,
                    "file": file,
                    "backing": job.node,
                },
            )
        actions: list[dict[str, object]] = []
        for job in jobs:
            if bitmap is not None:
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": job.node, "name": bitmap, "persistent": True,
                    "granularity": tracking.GRANULARITY,
                }})  # fmt: skip
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": job.job_id, "device": job.node, "target": job.target_node, "sync": "none",
            }})  # fmt: skip
        try:
            await target.execute("transaction", {"actions": actions})
        except QmpCommandError as exc:
            raise VmrError(f"cannot start tracking of {', '.join(nodes)}: {exc.desc}") from exc
        started = True
        sock.unlink(missing_ok=True)
        await target.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
        )
        for i, job in enumerate(jobs):
            await target.execute(
                "block-export-add",
                {"type": "nbd", "id": f"{EXPORT_PREFIX}{i}", "node-name": job.target_node,
                 "name": names[i], "writable": False},
            )  # fmt: skip
    except BaseException:
        with contextlib.suppress(VmrError, TimeoutError):
            await close_source(target, source)
        if started and bitmap is not None:
            for node in nodes:
                with contextlib.suppress(QmpCommandError):
                    await target.execute(
                        "block-dirty-bitmap-remove", {"node": node, "name": bitmap}
                    )
        raise
    return source


async def close_source(target: QmpTarget, source: Source) -> None:
    """Stop exporting and fleecing; the tracking bitmap stays."""
    if source.run_dir is not None:
        await clear_source(target, source.run_dir)


# -- the copy ------------------------------------------------------------------------------


async def convert(
    source: Source,
    disk: int,
    host: str,
    port: int,
    export: str,
    creds: TlsCreds,
    tls_hostname: str,
    progress: Progress | None = None,
    env: Mapping[str, str] = BULK_ENV,
    max_bytes_per_sec: int = 0,
) -> None:
    """Copy disk ``disk`` of ``source`` into the replica's NBD export; progress in percent.
    ``max_bytes_per_sec`` (0: none) holds the writes to the export, so the link, to that rate
    with QEMU's own throttle filter.

    A cancelled caller kills qemu-img; so does the agent's death (the kernel sends SIGTERM).
    """
    target = (
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},"
        f"tls-creds={TLS_ID}"
        + (f",tls-hostname={kv(tls_hostname)}" if creds.kind == "x509" else "")
    )
    throttle: list[str] = []
    if max_bytes_per_sec:
        throttle = ["--object", f"throttle-group,id=vmr-bw,x-bps-write={max_bytes_per_sec}"]
        target = "driver=throttle,throttle-group=vmr-bw," + ",".join(
            f"file.{option}" for option in target.split(",")
        )
    argv = [
        qemu_img.QEMU_IMG, "convert", "-p", "-n", "-W", "-m", "16", "--target-is-zero",
        "--object", creds.options("client"), *throttle,
        "--image-opts", source.image_opts[disk],
        "--target-image-opts", target,
    ]  # fmt: skip
    status, message = await _run_convert(argv, progress, env)
    if status != 0:
        raise _convert_error(message, disk, f"{host}:{port}")


async def export_to_file(
    source: Source, disk: int, dest: Path, progress: Progress | None = None,
    env: Mapping[str, str] = BULK_ENV,
) -> None:  # fmt: skip
    """Copy disk ``disk`` of ``source`` into a new standalone qcow2 file (offline media)."""
    argv = [
        qemu_img.QEMU_IMG, "convert", "-p", "-W", "-m", "16", "-O", "qcow2",
        "--image-opts", source.image_opts[disk], str(dest),
    ]  # fmt: skip
    status, message = await _run_convert(argv, progress, env)
    if status != 0:
        lines = [line.removeprefix("qemu-img: ") for line in message.splitlines() if line.strip()]
        reason = "; ".join(lines[-2:]) or "qemu-img convert failed"
        full = "disk full: " if os.strerror(errno.ENOSPC) in message else ""
        raise StorageError(f"{full}cannot write disk {disk} to {dest}: {reason}")


async def _run_convert(
    argv: list[str], progress: Progress | None, env: Mapping[str, str]
) -> tuple[int, str]:
    """Run ``qemu-img convert -p``, reporting its progress; its exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    try:
        while chunk := await proc.stdout.read(4096):
            if progress is not None and (found := _PROGRESS_RE.findall(chunk)):
                progress(float(found[-1]))
        status = await proc.wait()
        message = (await errors).decode(errors="replace").strip()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        errors.cancel()
        raise
    return status, message


def _convert_error(message: str, disk: int, where: str) -> VmrError:
    lines = [line.removeprefix("qemu-img: ") for line in message.splitlines() if line.strip()]
    reason = "; ".join(lines[-2:]) or "qemu-img convert failed"
    if os.strerror(errno.ENOSPC) in message:
        return StorageError(
            f"disk full on the replica during the initial copy of disk {disk}: {reason}"
        )
    if "error while writing" in message:
        # The replica's storage, or the connection to it: NBD reports both as an I/O error.
        return ConnectionFailed(
            f"initial copy of disk {disk} failed writing to the replica: {reason}"
        )
    return ConnectionFailed(f"initial copy of disk {disk} to {where} failed: {reason}")
