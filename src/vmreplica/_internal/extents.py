"""Byte ranges of disks, ``(offset, length)``: their arithmetic and their JSON form.

Pure, and shared by the engine (failback ranges) and the drivers (dirty ranges, copies).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from vmreplica.errors import IntegrityError

Extent = tuple[int, int]
"""``(offset, length)`` in bytes."""


def coalesce(extents: Iterable[Sequence[int]]) -> list[Extent]:
    """Sorted, with overlapping and adjacent ranges merged; empty ranges dropped."""
    out: list[Extent] = []
    for offset, length in sorted((int(e[0]), int(e[1])) for e in extents):
        if length <= 0:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            start, size = out[-1]
            out[-1] = (start, max(size, offset + length - start))
        else:
            out.append((offset, length))
    return out


def align(extents: Iterable[Sequence[int]], granularity: int, size: int) -> list[Extent]:
    """Widened to whole units of ``granularity`` and clipped to ``size``.

    A write of part of a qcow2 cluster in an image without a backing file fills the rest of the
    cluster with zeros, which would then overwrite the replica's data there; copying whole
    clusters from the same source leaves nothing of the kind.
    """
    widened = []
    for offset, length in coalesce(extents):
        start = max(0, offset - offset % granularity)
        end = min(size, -(-(offset + length) // granularity) * granularity)
        if end > start:
            widened.append((start, end - start))
    return coalesce(widened)


def union(*per_disk: Mapping[int, Sequence[Extent]], disks: int) -> dict[int, list[Extent]]:
    """Disk by disk, every range any of the maps names."""
    return {n: coalesce([e for m in per_disk for e in m.get(n, [])]) for n in range(disks)}


def to_json(extents: Mapping[int, Sequence[Extent]]) -> dict[str, list[list[int]]]:
    """Keyed by the disk's position in the replication (``disk{n}`` of a delta)."""
    return {
        str(n): [[offset, length] for offset, length in coalesce(e)] for n, e in extents.items()
    }


def from_json(data: object, disks: int) -> dict[int, list[Extent]]:
    """Inverse of :func:`to_json`; anything else is refused, never half used."""
    if not isinstance(data, dict):
        raise IntegrityError("failback ranges are not an object")
    out: dict[int, list[Extent]] = {}
    for key, ranges in data.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < disks):
            raise IntegrityError(f"failback ranges name an unknown disk {key!r}")
        if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int and v >= 0 for v in r)
            for r in ranges
        ):
            raise IntegrityError(f"failback ranges of disk {key} are malformed")
        out[int(key)] = coalesce(ranges)
    return out
