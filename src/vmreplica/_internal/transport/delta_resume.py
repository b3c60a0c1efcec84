"""Where a cut delta stream stopped, so that it goes on from there instead of from zero.

When a stream is cut (the connection lost, not a refusal), the replica keeps its stage: the
disks already verified (``disk{i}.qcow2``), the one it was writing (``disk{k}.qcow2.part``,
fsynced) and ``resume.json``, naming the manifest (by the blake3 of its JSON) and the point
``(k, offset)``: the bytes of disk k that reached the file. STATUS announces that point; a sender
that holds the very same delta sends its manifest again, then disk k from that offset (as a new
zstd frame when compressed) and the later disks whole. Nothing is trusted more for it: the
prefix is hashed again from the stage, and every file must still match the manifest's size and
blake3 in the end. On the Kerberos listener a kept part was never covered by a GSS MIC, so it
is trusted through that same blake3 only (the resumed request's MIC covers the manifest); a body
that ends cleanly without its MIC trailer is refused as tampered, and is sent again whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import blake3

from vmreplica._internal.files import fsync_dir, write_atomic
from vmreplica._internal.transport.fields import Body
from vmreplica.errors import InvalidArgument

RESUME = "resume.json"
_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class ResumePoint:
    sequence: int
    manifest: str  # blake3 hex of the manifest's JSON, as the stream carried it
    disk: int
    offset: int

    def to_json(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "manifest": self.manifest, "disk": self.disk,
                "offset": self.offset}  # fmt: skip

    @classmethod
    def from_json(cls, b: Body) -> Self:
        return cls(
            sequence=b.integer("sequence"), manifest=b.string("manifest", 64),
            disk=b.integer("disk", high=1023), offset=b.integer("offset"),
        )  # fmt: skip

    @property
    def query(self) -> str:
        """The DELTA request's ``resume`` parameter."""
        return f"{self.disk}:{self.offset}"


def digest(manifest_json: str) -> str:
    return blake3.blake3(manifest_json.encode()).hexdigest()


def parse_query(value: str | None) -> tuple[int, int] | None:
    """``resume=DISK:OFFSET`` of a DELTA request; absent means a whole stream."""
    if value is None:
        return None
    disk, _, offset = value.partition(":")
    if not (disk.isdecimal() and offset.isdecimal() and len(disk) <= 4 and len(offset) <= 19):
        raise InvalidArgument(f"query parameter resume must be DISK:OFFSET, not {value[:40]!r}")
    if int(offset) > _MAX:
        raise InvalidArgument("query parameter resume: offset out of range")
    return int(disk), int(offset)


def save(stage: Path, point: ResumePoint) -> None:
    write_atomic(stage / RESUME, json.dumps(point.to_json()).encode())
    fsync_dir(stage)


def load(stage: Path) -> ResumePoint | None:
    """The point a cut stream left in ``stage``, if its disk's part file holds at least
    ``offset`` bytes (the receiver checks the disks before it)."""
    try:
        point = ResumePoint.from_json(Body(json.loads((stage / RESUME).read_text()), RESUME))
    except (OSError, ValueError, InvalidArgument):
        return None
    part = stage / f"disk{point.disk}.qcow2.part"
    try:
        if point.offset and part.stat().st_size < point.offset:
            return None
    except OSError:
        return None
    return point


def clear(stage: Path) -> None:
    """Before a resumed stream writes: a stage being written is no longer a resume point."""
    (stage / RESUME).unlink(missing_ok=True)
    fsync_dir(stage)
