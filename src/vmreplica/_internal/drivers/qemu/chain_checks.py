"""Checks of a replica chain (chain.py) and of a delta against it: what may be applied, and
whether the chain is whole."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vmreplica._internal.drivers.qemu import qcow2_header, qemu_img
from vmreplica.errors import IntegrityError, InvalidArgument, VmrError

if TYPE_CHECKING:
    from vmreplica._internal.drivers.qemu.chain import ReplicaChain


def check_delta(chain: ReplicaChain, delta: Path, *, allow_backing: bool) -> None:
    """Refuse a delta that would not fit ``tip``, or whose header would read foreign files.

    Both headers are read without a process (qcow2_header.py: strictly, refusing anything a
    delta never has). A backing file is refused unless ``allow_backing``, and then allowed only
    if it is ``tip`` or the resynchronization's overlay: an older version's apply wrote it.
    """
    if delta.resolve().parent == chain.dir and chain.is_chain_name(delta.name):
        raise InvalidArgument(f"{delta} is part of the replica chain, not a delta")
    try:
        header = qcow2_header.read(delta)
    except qcow2_header.DataFileError as exc:
        raise IntegrityError(
            f"delta {delta} is corrupt or uses an external data file: {exc}"
        ) from exc
    except (qcow2_header.HeaderError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise IntegrityError(f"delta {delta} is not a readable qcow2 image: {why}") from exc
    tip_size = qemu_img.header_virtual_size(chain.tip)
    if header.virtual_size != tip_size:
        raise IntegrityError(
            f"delta {delta} is {header.virtual_size} bytes; the replica disk is {tip_size}"
        )
    if (backing := header.backing) is not None:
        if not allow_backing:
            raise IntegrityError(f"delta {delta} has a backing file ({backing}); deltas have none")
        if (delta.parent / backing).resolve() not in (chain.tip, chain.resync):
            raise IntegrityError(f"delta {delta} has an unexpected backing file {backing}")


async def verify(chain: ReplicaChain) -> None:
    """Raise IntegrityError unless the chain is exactly base ← rp… ← tip and every image
    passes ``qemu-img check``."""
    if (pending := chain.pending_delta()) is not None:
        raise IntegrityError(f"delta {pending} is half applied to {chain.dir}")
    for must in (chain.base, chain.tip):
        if not must.exists():
            raise IntegrityError(f"{must.name} is missing in {chain.dir}")
    expected = [chain.tip, *(chain.rp_path(i) for i in reversed(chain.point_ids())), chain.base]
    try:
        images = await qemu_img.info_chain(chain.tip)
    except VmrError as exc:
        raise IntegrityError(f"backing chain of {chain.tip} cannot be opened: {exc}") from exc
    actual = [Path(image["filename"]).resolve() for image in images]
    if actual != expected:
        shown, wanted = _arrows(chain, actual), _arrows(chain, expected)
        raise IntegrityError(f"chain in {chain.dir} is {shown}, not {wanted}")
    size = int(images[-1]["virtual-size"])
    for image, path in zip(images, expected, strict=True):
        if int(image["virtual-size"]) != size:
            raise IntegrityError(f"{path.name} is {image['virtual-size']} bytes, not {size}")
        formats = {image.get("format"), image.get("backing-filename-format", "qcow2")}
        if formats != {"qcow2"}:
            raise IntegrityError(f"{path.name} or its backing file is not qcow2")
    for path in expected:
        if (problem := await qemu_img.check(path)) is not None:
            raise IntegrityError(f"{path.name} in {chain.dir} fails qemu-img check: {problem}")


def _arrows(chain: ReplicaChain, top_first: list[Path]) -> str:
    return " ← ".join(p.name if p.parent == chain.dir else str(p) for p in top_first[::-1])
