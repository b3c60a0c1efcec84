"""Typed async wrapper over the ``qemu-img`` tool.

Every disk-image operation of vmreplica outside a running QEMU goes through here, so exit-status
checks, error wording and argument quoting live in one place. Image paths are made absolute before
they reach ``qemu-img``: an absolute path can neither be taken for an option (``-x``) nor for a
protocol prefix (``nbd:``, ``json:``). Backing names are stored as given, so callers choose
between a relative name (resolved against the image's own directory, which lets a chain directory
move) and an absolute one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from vmreplica._internal import faults
from vmreplica._internal.drivers.qemu.children import die_with_parent, die_with_parent_argv
from vmreplica.errors import InvalidArgument, InvalidState, StorageError, VmrError

QEMU_IMG = "qemu-img"
FORMAT = "qcow2"


@dataclass(frozen=True)
class Extent:
    """One run of ``qemu-img map``; ``depth`` counts how far down the chain the data lives."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap as ``qemu-img info`` reports it."""

    name: str
    flags: frozenset[str]
    granularity: int

    @property
    def in_use(self) -> bool:
        """An unclean close left the bitmap inconsistent: it may only be removed, never trusted."""
        return "in-use" in self.flags


def _arg(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def _error(cmd: str, subject: str, stderr: str, rc: int) -> VmrError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # qemu-img may add a hint after the error line ("Is another process using the image?"),
    # so the message runs from the last "qemu-img:" line to the end.
    starts = [i for i, line in enumerate(lines) if line.startswith("qemu-img:")]
    tail = lines[starts[-1] :] if starts else lines[-1:]
    detail = " ".join(line.removeprefix("qemu-img:").strip() for line in tail)
    detail = detail.removeprefix(f"{subject}: ") or f"exit status {rc}"
    what = f"qemu-img {cmd} {subject}"
    if "No space left on device" in detail or "ENOSPC" in detail:
        return StorageError(f"disk full: {what}: {detail}")
    if "Failed to get" in detail and "lock" in detail:
        return InvalidState(f"{what}: the image is in use by another process ({detail})")
    return StorageError(f"{what} failed: {detail}")


async def _run(
    cmd: str, subject: str, args: Sequence[str], ok: Container[int] = (0,)
) -> tuple[int, str]:
    """Run qemu-img; a cancelled caller kills it, as a crash would, which every user tolerates."""
    try:
        argv, set_by_setpriv = die_with_parent_argv([QEMU_IMG, *args])
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=None if set_by_setpriv else die_with_parent(signal.SIGKILL),
        )
    except FileNotFoundError as exc:
        raise VmrError("qemu-img is not installed (Debian package qemu-utils)") from exc
    faults.child_hit(f"qemu-img.{cmd.split()[0]}", proc.pid)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    rc = proc.returncode if proc.returncode is not None else -1
    if rc == 127 and set_by_setpriv and b"failed to execute" in err:  # setpriv's own failure
        raise VmrError("qemu-img is not installed (Debian package qemu-utils)")
    if rc not in ok:
        raise _error(cmd, subject, err.decode(errors="replace"), rc)
    return rc, out.decode(errors="replace")


async def _json(cmd: str, subject: str, args: Sequence[str], ok: Container[int] = (0,)) -> Any:
    _, out = await _run(cmd, subject, args, ok)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise VmrError(f"qemu-img {cmd} {subject}: unreadable JSON ({exc})") from exc


async def create(
    path: str | os.PathLike[str],
    size_bytes: int | None,
    backing: str | os.PathLike[str] | None = None,
    *,
    cluster_size: int | None = None,
) -> None:
    """Create a qcow2 image; without a size it takes the backing file's virtual size."""
    if size_bytes is None and backing is None:
        raise InvalidArgument(f"cannot create {path}: give a size or a backing file")
    if size_bytes is not None and size_bytes <= 0:
        raise InvalidArgument(f"cannot create {path}: size must be greater than zero")
    args = ["create", "-q", "-f", FORMAT]
    if backing is not None:
        args += ["-b", os.fspath(backing), "-F", FORMAT]
    if cluster_size is not None:
        args += ["-o", f"cluster_size={cluster_size}"]
    args.append(_arg(path))
    if size_bytes is not None:
        args.append(str(size_bytes))
    await _run("create", _arg(path), args)


async def create_over_data_file(path: str | os.PathLike[str], data_file: str | os.PathLike[str],
                                size_bytes: int) -> None:  # fmt: skip
    """A qcow2 image of metadata only above an existing raw ``data_file``, which it leaves as it
    is: ``data_file_raw`` keeps the data file a valid raw image of the disk, and
    ``preallocation=metadata`` maps every cluster to the same offset in it, so the guest sees
    exactly the raw disk's content.

    ``qemu-img create -o data_file=`` would create (truncate) the data file itself: the image is
    made over a throw-away file, and ``amend`` then points it at the real one.
    """
    scratch = f"{os.fspath(path)}.tmp-data"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(scratch)
    opts = f"data_file={scratch},data_file_raw=on,preallocation=metadata"
    try:
        await _run("create", _arg(path), ["create", "-q", "-f", FORMAT, "-o", opts, _arg(path),
                                          str(size_bytes)])  # fmt: skip
        amend = ["amend", "-f", FORMAT, "-o", f"data_file={os.fspath(data_file)}", _arg(path)]
        await _run("amend", _arg(path), amend)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


async def info(
    path: str | os.PathLike[str], *, fmt: str = FORMAT, force_share: bool = False
) -> dict[str, Any]:
    """The image's own header; ``force_share`` reads one that a running QEMU holds open."""
    args = ["info", "--output=json", "-f", fmt, *(["-U"] if force_share else []), _arg(path)]
    result = await _json("info", _arg(path), args)
    if not isinstance(result, dict):
        raise VmrError(f"qemu-img info {path}: unexpected output")
    return result


async def info_chain(
    path: str | os.PathLike[str], *, fmt: str = FORMAT, force_share: bool = False
) -> list[dict[str, Any]]:
    """Headers of the image and of every backing file below it, top first."""
    args = ["info", "--output=json", "--backing-chain", "-f", fmt]
    args += [*(["-U"] if force_share else []), _arg(path)]
    result = await _json("info --backing-chain", _arg(path), args)
    if not isinstance(result, list) or not all(isinstance(i, dict) for i in result):
        raise VmrError(f"qemu-img info --backing-chain {path}: unexpected output")
    return result


async def virtual_size(
    path: str | os.PathLike[str], *, fmt: str = FORMAT, force_share: bool = False
) -> int:
    return int((await info(path, fmt=fmt, force_share=force_share))["virtual-size"])


_QCOW2_MAGIC = b"QFI\xfb"
_SECTOR = 512


def header_virtual_size(path: str | os.PathLike[str]) -> int:
    """The virtual size of a qcow2 image as ``qemu-img info`` reports it (the header's 64-bit
    size at offset 24, in whole 512-byte sectors), read without a process. Only for an image
    whose chain a qemu-img process opened in the same step: this reads the header alone."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise StorageError(f"qemu-img info {_arg(path)} failed: {exc.strerror}") from exc
    if len(head) < 32 or head[:4] != _QCOW2_MAGIC or int.from_bytes(head[4:8], "big") not in (2, 3):
        raise StorageError(f"qemu-img info {_arg(path)} failed: not a qcow2 image")
    return int.from_bytes(head[24:32], "big") // _SECTOR * _SECTOR


async def measure_required(path: str | os.PathLike[str], *, fmt: str = FORMAT) -> int:
    """Bytes a qcow2 copy of the image's whole content (backing files included) needs; it
    reads only allocation metadata, and may be run on an image a running QEMU holds."""
    args = ["measure", "--output=json", "-O", FORMAT, "-f", fmt, "-U", _arg(path)]
    result = await _json("measure", _arg(path), args)
    if not isinstance(result, dict) or not isinstance(result.get("required"), int):
        raise VmrError(f"qemu-img measure {path}: unexpected output")
    return int(result["required"])


async def _rebase(
    path: str | os.PathLike[str], backing: str | os.PathLike[str] | None, unsafe: bool
) -> None:
    args = ["rebase", *(["-u"] if unsafe else []), "-f", FORMAT]
    args += ["-b", ""] if backing is None else ["-b", os.fspath(backing), "-F", FORMAT]
    await _run("rebase -u" if unsafe else "rebase", _arg(path), [*args, _arg(path)])


async def rebase_unsafe(
    path: str | os.PathLike[str], backing: str | os.PathLike[str] | None
) -> None:
    """Rewrite only the backing pointer: right when both backings show the same content."""
    await _rebase(path, backing, unsafe=True)


async def rebase(path: str | os.PathLike[str], backing: str | os.PathLike[str] | None) -> None:
    """Change the backing file and copy in every difference, so the image reads the same."""
    await _rebase(path, backing, unsafe=False)


async def commit(path: str | os.PathLike[str], *, empty_top: bool = False) -> None:
    """Write the image's clusters into its backing file.

    Unlike qemu-img's default, the top is left untouched (``-d``): it may still be read through,
    and an unchanged top makes a retried commit write exactly the same data again.
    """
    args = ["commit", "-f", FORMAT, *([] if empty_top else ["-d"]), _arg(path)]
    await _run("commit", _arg(path), args)


async def commit_into(path: str | os.PathLike[str], backing: str | os.PathLike[str]) -> None:
    """Write the image's clusters into ``backing``, named as its backing file when qemu-img opens
    it (a ``json:`` image spec) instead of by its header: one process where ``rebase -u`` and
    ``commit`` took two, and the image, header included, is left untouched (``-d``, as in
    :func:`commit`). Whatever backing the header names is ignored."""
    spec = {
        "driver": FORMAT,
        "file": {"driver": "file", "filename": _arg(path)},
        "backing": {"driver": FORMAT, "file": {"driver": "file", "filename": _arg(backing)}},
    }
    args = ["commit", "-f", FORMAT, "-d", "json:" + json.dumps(spec)]
    await _run("commit", _arg(path), args)


async def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    fmt_a: str = FORMAT,
    fmt_b: str = FORMAT,
    strict: bool = False,
) -> bool:
    """Whether the two images read the same; ``strict`` also requires equal size and allocation."""
    args = ["compare", "-q", "-f", fmt_a, "-F", fmt_b, *(["-s"] if strict else [])]
    rc, _ = await _run("compare", f"{a} {b}", [*args, _arg(a), _arg(b)], ok=(0, 1))
    return rc == 0


async def check(path: str | os.PathLike[str], *, fmt: str = FORMAT) -> str | None:
    """None when the metadata is consistent, else what is wrong.

    Leaked clusters (left by a crash mid-write) only waste space, so they do not count.
    """
    args = ["check", "--output=json", "-f", fmt, _arg(path)]
    result = await _json("check", _arg(path), args, ok=(0, 2, 3))
    if not isinstance(result, dict):
        raise VmrError(f"qemu-img check {path}: unexpected output")
    corruptions = int(result.get("corruptions", 0))
    errors = int(result.get("check-errors", 0))
    if corruptions or errors:
        return f"{corruptions} corruptions, {errors} check errors"
    return None


async def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_fmt: str = FORMAT,
    dst_fmt: str = FORMAT,
    compress: bool = False,
) -> None:
    """Copy an image (the whole chain under it, flattened) into a new standalone one."""
    args = ["convert", "-f", src_fmt, "-O", dst_fmt, *(["-c"] if compress else [])]
    await _run("convert", f"{src} {dst}", [*args, _arg(src), _arg(dst)])


async def map(
    path: str | os.PathLike[str], *, fmt: str = FORMAT, force_share: bool = False
) -> list[Extent]:
    """Allocation of the image through its whole chain, as runs of equal status
    (``force_share``: of an image a running QEMU has open)."""
    share = ["-U"] if force_share else []
    result = await _json("map", _arg(path), ["map", "--output=json", *share, "-f", fmt, _arg(path)])
    if not isinstance(result, list):
        raise VmrError(f"qemu-img map {path}: unexpected output")
    return [
        Extent(
            start=int(e["start"]),
            length=int(e["length"]),
            depth=int(e["depth"]),
            present=bool(e.get("present", True)),
            zero=bool(e["zero"]),
            data=bool(e["data"]),
            offset=int(e["offset"]) if "offset" in e else None,
        )
        for e in result
    ]


async def bitmaps(path: str | os.PathLike[str], *, force_share: bool = False) -> list[Bitmap]:
    """The persistent dirty bitmaps of a qcow2 image, with their ``auto``/``in-use`` flags."""
    data = (await info(path, force_share=force_share)).get("format-specific", {}).get("data", {})
    return [
        Bitmap(
            name=str(b["name"]),
            flags=frozenset(str(f) for f in b.get("flags", [])),
            granularity=int(b.get("granularity", 0)),
        )
        for b in data.get("bitmaps", [])
    ]


async def bitmap_add(path: str | os.PathLike[str], name: str) -> None:
    """Add an enabled persistent bitmap to an image nothing has open."""
    await _run("bitmap", str(path), ["bitmap", "--add", "-f", "qcow2", str(path), name])


async def bitmap_remove(path: str | os.PathLike[str], name: str) -> None:
    await _run("bitmap", str(path), ["bitmap", "--remove", "-f", "qcow2", str(path), name])
