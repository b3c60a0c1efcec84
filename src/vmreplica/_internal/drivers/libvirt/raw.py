"""Raw disks (image files, LVM logical volumes, iSCSI LUNs) under change tracking, as they are.

QEMU keeps a persistent dirty bitmap only inside a qcow2 image, and a raw disk has no room for
one. Converting the guest's disk is not an option (an LVM volume stays an LVM volume), so each
raw disk gets a small qcow2 image of metadata only, whose external data file is the raw disk
itself (``data_file_raw=on``, every cluster mapped to the same offset: qemu_img.
create_over_data_file). The domain's disk is that qcow2; the guest's data stays in place, a
valid raw image at every moment, and libvirt's checkpoints keep their bitmaps in the metadata
image. It lives in the VM's run directory (``meta/disk{n}.qcow2``), a few hundred KiB per GiB.

A disk's format is told once, when it is given to a VM (``vm new --disk-path``: raw unless it
starts with the qcow2 magic, the same probe qemu-img makes; a domain adopted from virsh: what
its XML says), and recorded with the VM (its ``formats``, which travel with it to another node
of a cluster on `vm move`). From then on the disk is opened as recorded, never as its first
bytes say: they are the guest's, and a guest that wrote a qcow2 header there would otherwise
have the host open its disk as qcow2, with a backing or data file of the guest's choosing (any
file of the host). Only a disk whose format is not recorded (``None``: a VM moved here from a
node of an older version) is still told by its metadata image, or else by its first bytes.
"""

from __future__ import annotations

from pathlib import Path

from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica.errors import StorageError, VmrError

QCOW2_MAGIC = b"QFI\xfb"
META_DIR = "meta"


def is_raw(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) != QCOW2_MAGIC
    except OSError as exc:
        raise StorageError(f"cannot read disk {path}: {exc.strerror}") from exc


async def recorded_or_told(disk: Path, run_dir: Path, index: int, fmt: str | None) -> str:
    """``fmt`` if recorded; else raw if the disk has its metadata image, else by its first
    bytes."""
    if fmt is not None:
        return fmt
    if await known_raw(disk, run_dir, index):
        return "raw"
    return "raw" if is_raw(disk) else "qcow2"


async def known_raw(disk: Path, run_dir: Path, index: int) -> bool:
    """``disk`` (the VM's disk ``index``) has its metadata image already: raw, whatever it
    holds now."""
    meta = meta_path(run_dir, index)
    return meta.exists() and await _data_file(meta) == str(disk.absolute())


async def disk_size(disk: Path, run_dir: Path, index: int, fmt: str | None) -> int:
    """The guest-visible size of the VM's disk ``index``, of recorded format ``fmt``."""
    fmt = await recorded_or_told(disk, run_dir, index, fmt)
    return await qemu_img.virtual_size(disk, fmt=fmt, force_share=True)


async def image_size(path: Path) -> int:
    """The guest-visible size of a raw or qcow2 disk (one a running QEMU may hold)."""
    fmt = "raw" if is_raw(path) else "qcow2"
    return await qemu_img.virtual_size(path, fmt=fmt, force_share=True)


def meta_path(run_dir: Path, index: int) -> Path:
    return run_dir.absolute() / META_DIR / f"disk{index}.qcow2"


async def _data_file(meta: Path) -> str | None:
    try:
        info = await qemu_img.info(meta, force_share=True)
    except VmrError:
        return None
    data = info.get("format-specific", {}).get("data", {})
    return str(data["data-file"]) if "data-file" in data else None


async def domain_disks(
    disks: tuple[Path, ...], run_dir: Path, formats: tuple[str | None, ...],
    declared: frozenset[int] = frozenset(),
) -> tuple[Path, ...]:  # fmt: skip
    """What the domain opens for each disk: a qcow2 disk itself, a raw one through its
    metadata image (made when missing or over another data file: its bitmaps are then gone,
    and the next cycle asks for a resynchronization). ``formats``: the recorded ones (None: not
    recorded). ``declared``: the disks the domain's own XML opens as raw (a domain adopted from
    virsh), raw whatever they start with."""
    out = []
    for i, disk in enumerate(disks):
        meta = meta_path(run_dir, i)
        if await known_raw(disk, run_dir, i):
            out.append(meta)
            continue
        fmt = formats[i] if i < len(formats) else None
        if i not in declared and fmt != "raw" and (fmt == "qcow2" or not is_raw(disk)):
            out.append(disk.absolute())
            continue
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        size = await qemu_img.virtual_size(disk, fmt="raw", force_share=True)
        await qemu_img.create_over_data_file(meta, disk.absolute(), size)
        out.append(meta)
    return tuple(out)
