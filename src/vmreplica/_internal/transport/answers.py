"""The answers of the replication protocol (:mod:`vmreplica._internal.transport.protocol` has
the routes and the requests): parsed as carefully as requests, since a replica is not trusted
either."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica._internal.transport.fields import HEX64, Body, parse_port
from vmreplica.errors import InvalidArgument

MAX_HASH_BLOCKS = 65536  # per resync-hashes answer: about 4.3 MiB of JSON


@dataclasses.dataclass(frozen=True)
class HelloAnswer:
    replica_server: str
    peer: str | None
    authorization_entry: str | None
    trust_group: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "hello answer")
        return cls(
            replica_server=b.string("replica_server", 253),
            peer=b.opt_string("peer", 253),
            authorization_entry=b.opt_string("authorization_entry", 253),
            trust_group=b.opt_string("trust_group", 64),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EnableAnswer:
    storage_dir: str | None
    already: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "enable answer")
        return cls(storage_dir=b.opt_string("storage_dir"), already=b.boolean("already", False))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StatusAnswer:
    sequence: int
    state: str
    resume: ResumePoint | None = None  # a cut delta the replica kept (delta_resume.py)
    # What a cut initial copy wrote, kept as the chains' base (engine/replica/kept.py).
    kept_initial: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "status answer")
        resume = b.sub("resume", optional=True)
        return cls(
            sequence=b.integer("sequence"), state=b.string("state", 64),
            resume=None if resume is None else ResumePoint.from_json(resume),
            kept_initial=b.boolean("kept_initial", False),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sequence": self.sequence, "state": self.state}
        out |= {"kept_initial": True} if self.kept_initial else {}
        return out | ({"resume": self.resume.to_json()} if self.resume else {})


@dataclasses.dataclass(frozen=True)
class InitialOpenAnswer:
    port: int
    exports: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "initial-open answer")
        exports = b.raw("exports")
        if not isinstance(exports, list) or not all(
            isinstance(e, str) and e.isprintable() and 0 < len(e) <= 256 for e in exports
        ):
            raise InvalidArgument("initial-open answer: field 'exports' must be a list of names")
        return cls(
            port=parse_port(b.raw("port"), "initial-open answer: port"), exports=tuple(exports)
        )

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "exports": list(self.exports)}


@dataclasses.dataclass(frozen=True)
class SequenceAnswer:
    """What initial-close and delta answer: the replica's sequence now (and a copy's size)."""

    sequence: int
    size: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "answer")
        return cls(sequence=b.integer("sequence"), size=b.opt_integer("size") or 0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VmStateAnswer:
    state: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(state=Body(data, "vm-state answer").string("state", 64))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReverseAnswer:
    """The old primary's word on a reverse: whether its tracking can name every range the new
    primary may lack, why not, and those ranges (JSON form of vmreplica._internal.extents)."""

    tracking_intact: bool
    reason: str | None
    extents: dict[str, list[list[int]]]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        b = Body(data, "reverse answer")
        extents = b.raw("extents")
        return cls(
            tracking_intact=b.boolean("tracking_intact", False),
            reason=b.opt_string("reason"),
            extents=extents if isinstance(extents, dict) else {},
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HashesAnswer:
    """blake3 of each block (hex), None for a block that reads as zeros."""

    hashes: tuple[bytes | None, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        raw = Body(data, "resync-hashes answer").raw("hashes")
        if not isinstance(raw, list) or len(raw) > MAX_HASH_BLOCKS:
            raise InvalidArgument("resync-hashes answer: field 'hashes' must be a list")
        out: list[bytes | None] = []
        for item in raw:
            if item is None:
                out.append(None)
            elif isinstance(item, str) and HEX64.fullmatch(item):
                out.append(bytes.fromhex(item))
            else:
                raise InvalidArgument("resync-hashes answer: a hash is not 64 hex digits")
        return cls(tuple(out))

    def to_json(self) -> dict[str, Any]:
        return {"hashes": [None if h is None else h.hex() for h in self.hashes]}
