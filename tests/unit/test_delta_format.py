"""The delta wire format: round trips, and every way a stream can be wrong leaves nothing staged."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import blake3
import pytest

from vmreplica._internal.transport import delta, delta_resume
from vmreplica._internal.transport.delta import (
    CHUNK,
    MANIFEST,
    DeltaManifest,
    DiskEntry,
    build_manifest,
    iter_stream,
)
from vmreplica._internal.transport.delta_receive import StreamCut, receive, stage_is_complete
from vmreplica._internal.transport.delta_resume import ResumePoint
from vmreplica.errors import IntegrityError, InvalidArgument, InvalidState, StorageError

VM = "vm-0001"
HEADER_MAX = 4096  # generous bound of magic + length + manifest of a few disks


def text_like(n: int, seed: int = 1) -> bytes:
    r = random.Random(seed)
    words = [b"kernel:", b"eth0", b"link", b"up", b"systemd[1]:", b"Started", b"session", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(64)) + b"\n"
    return bytes(out[:n])


def make_disks(d: Path, files: dict[int, bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, data in files.items():
        (d / f"disk{i}.qcow2").write_bytes(data)
    return d


@pytest.fixture
def big_delta(tmp_path: Path) -> Path:
    """Random, text-like, empty and several-MiB disks (index 3 absent: indexes need not be dense)."""
    r = random.Random(7)
    return make_disks(
        tmp_path / "delta",
        {0: r.randbytes(300_000), 1: text_like(5 << 20), 2: b"", 4: r.randbytes(3 << 20)},
    )


@pytest.fixture
def small_delta(tmp_path: Path) -> Path:
    r = random.Random(8)
    return make_disks(tmp_path / "small", {0: r.randbytes(9_000), 1: text_like(20_000), 2: b""})


def manifest_of(d: Path, compression: str, sequence: int = 5) -> DeltaManifest:
    return asyncio.run(build_manifest(d, VM, sequence, "CrashConsistent", compression))


def pack(d: Path, m: DeltaManifest, start: ResumePoint | None = None) -> bytes:
    async def collect() -> bytes:
        return b"".join([piece async for piece in iter_stream(d, m, start)])

    return asyncio.run(collect())


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for off in range(0, len(data), size):
        yield data[off : off + size]


def unpack(
    wire: bytes, stage: Path, chunk: int = 1 << 16, vm_id: str = VM, **kw: Any
) -> DeltaManifest:
    return asyncio.run(receive(chunked(wire, chunk), stage, expected_vm_id=vm_id, **kw))


def staged_nothing(stage: Path) -> bool:
    return not stage.exists() or not any(stage.iterdir())


def assert_same_disks(src: Path, stage: Path, m: DeltaManifest) -> None:
    for d in m.disks:
        assert (stage / f"disk{d.index}.qcow2").read_bytes() == (
            src / f"disk{d.index}.qcow2"
        ).read_bytes()
    assert sorted(p.name for p in stage.iterdir()) == sorted(
        [MANIFEST, *(f"disk{d.index}.qcow2" for d in m.disks)]
    )


# --- manifest ---------------------------------------------------------------------------------


def test_build_manifest_hashes_files_and_is_idempotent(big_delta: Path) -> None:
    m = manifest_of(big_delta, "zstd")
    assert [d.index for d in m.disks] == [0, 1, 2, 4]
    for d in m.disks:
        data = (big_delta / f"disk{d.index}.qcow2").read_bytes()
        assert (d.file_size, d.blake3) == (len(data), blake3.blake3(data).hexdigest())
    assert DeltaManifest.from_json((big_delta / MANIFEST).read_text()) == m
    before = (big_delta / MANIFEST).stat().st_mtime_ns
    again = manifest_of(big_delta, "zstd")
    assert again == m  # same created time, same hashes
    assert (big_delta / MANIFEST).stat().st_mtime_ns == before
    assert not list(big_delta.glob("*.tmp"))


def test_build_manifest_refuses_bad_arguments(tmp_path: Path, big_delta: Path) -> None:
    with pytest.raises(InvalidArgument, match="consistency"):
        asyncio.run(build_manifest(big_delta, VM, 1, "Sloppy", "zstd"))
    with pytest.raises(InvalidArgument, match="no disk files"):
        asyncio.run(
            build_manifest(make_disks(tmp_path / "e", {}), VM, 1, "CrashConsistent", "none")
        )


def test_manifest_json_roundtrip() -> None:
    m = DeltaManifest(VM, 3, "2025-01-02T03:04:05+00:00", "ApplicationConsistent", "none",
                      (DiskEntry(0, 10, "ab" * 32), DiskEntry(2, 0, "cd" * 32)))  # fmt: skip
    assert DeltaManifest.from_json(m.to_json()) == m
    assert DeltaManifest.from_json(m.to_json().encode()) == m


@pytest.mark.parametrize(
    "mutate",
    [
        lambda j: "not json",
        lambda j: "[]",
        lambda j: {k: v for k, v in j.items() if k != "sequence"},
        lambda j: {**j, "sequence": "5"},
        lambda j: {**j, "sequence": True},
        lambda j: {**j, "sequence": -1},
        lambda j: {**j, "vm_id": ""},
        lambda j: {**j, "vm_id": "a\nb"},
        lambda j: {**j, "created": "yesterday"},
        lambda j: {**j, "consistency": "Whatever"},
        lambda j: {**j, "compression": "gzip"},
        lambda j: {**j, "disks": []},
        lambda j: {**j, "disks": "disk0"},
        lambda j: {**j, "disks": [{**j["disks"][0], "file_size": -1}]},
        lambda j: {**j, "disks": [{**j["disks"][0], "blake3": "XYZ"}]},
        lambda j: {**j, "disks": [{**j["disks"][0], "blake3": int("1" * 64)}]},
        lambda j: {**j, "disks": [j["disks"][0], j["disks"][0]]},
    ],
)
def test_manifest_from_json_rejects_malformed(mutate: Callable[[dict[str, Any]], object]) -> None:
    good = DeltaManifest(VM, 1, "2025-01-02T03:04:05+00:00", "CrashConsistent", "zstd",
                         (DiskEntry(0, 1, "0" * 64),))  # fmt: skip
    bad = mutate(json.loads(good.to_json()))
    with pytest.raises(IntegrityError, match="malformed delta manifest"):
        DeltaManifest.from_json(bad if isinstance(bad, str) else json.dumps(bad))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("chunk", [7, 1 << 16, 10 << 20])
def test_roundtrip(big_delta: Path, tmp_path: Path, compression: str, chunk: int) -> None:
    m = manifest_of(big_delta, compression)
    stage = tmp_path / "stage"
    seen: list[DeltaManifest] = []
    got = unpack(pack(big_delta, m), stage, chunk, check_manifest=seen.append)
    assert got == m and seen == [m]
    assert_same_disks(big_delta, stage, m)
    assert stage_is_complete(stage) == m


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_roundtrip_one_byte_chunks(small_delta: Path, tmp_path: Path, compression: str) -> None:
    m = manifest_of(small_delta, compression)
    stage = tmp_path / "stage"
    stage.mkdir()  # an existing empty staging directory is fine too
    assert unpack(pack(small_delta, m), stage, 1) == m
    assert_same_disks(small_delta, stage, m)


def test_compression_shrinks_text_like_data(tmp_path: Path) -> None:
    src = make_disks(tmp_path / "t", {0: text_like(4 << 20)})
    raw = pack(src, manifest_of(src, "none"))
    packed = pack(src, manifest_of(src, "zstd"))
    assert 4 << 20 < len(raw) < (4 << 20) + HEADER_MAX
    assert len(packed) < 0.3 * len(raw)


def test_random_data_costs_little_when_compressed(big_delta: Path) -> None:
    raw, packed = pack(big_delta, manifest_of(big_delta, "none")), pack(big_delta, manifest_of(big_delta, "zstd"))  # fmt: skip
    total = sum(d.file_size for d in manifest_of(big_delta, "none").disks)
    assert total < len(raw) < total + HEADER_MAX
    assert len(packed) < len(raw)  # the text disk shrinks; random disks grow by at most ~0.1 %


# --- refusals and damage leave nothing behind -------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("where", [0.3, 0.5, 0.9, -1])
def test_flipped_byte_is_refused(
    big_delta: Path, tmp_path: Path, compression: str, where: float
) -> None:
    wire = bytearray(pack(big_delta, manifest_of(big_delta, compression)))
    pos = len(wire) - 1 if where == -1 else int(len(wire) * where)
    pos = len(wire) - 5 if compression == "zstd" and where == -1 else pos  # before the end mark
    wire[pos] ^= 0x40
    stage = tmp_path / "stage"
    with pytest.raises(IntegrityError, match="delta 5"):
        unpack(bytes(wire), stage)
    assert staged_nothing(stage)


def cut_at(wire: bytes, keep: float) -> bytes:
    return wire[: int(keep) if keep >= 1 else int(len(wire) * keep) if keep > 0 else len(wire) - 1]


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("keep", [3, 20, 0.5, 0.99, -1])
def test_a_truncated_stream_is_a_cut_that_applies_nothing(
    big_delta: Path, tmp_path: Path, compression: str, keep: float
) -> None:
    """A stream that stops short is a lost connection, never a delta: no manifest is staged.
    Once the manifest has arrived, what did arrive is kept as a resume point."""
    m = manifest_of(big_delta, compression)
    wire = pack(big_delta, m)
    cut = cut_at(wire, keep)
    stage = tmp_path / "stage"
    with pytest.raises(StreamCut, match="truncated"):
        unpack(cut, stage)
    assert not (stage / MANIFEST).exists()
    if keep in (3, 20):
        assert staged_nothing(stage)
    else:
        point = delta_resume.load(stage)
        assert point is not None and point.sequence == m.sequence
        assert point.manifest == delta_resume.digest(m.to_json())


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.99, -1])
def test_a_cut_stream_resumes_into_the_same_delta_sending_only_the_rest(
    big_delta: Path, tmp_path: Path, compression: str, keep: float
) -> None:
    m = manifest_of(big_delta, compression)
    wire = pack(big_delta, m)
    stage = tmp_path / "stage"
    with pytest.raises(StreamCut):
        unpack(cut_at(wire, keep), stage)
    point = delta_resume.load(stage)
    assert point is not None
    rest = pack(big_delta, m, start=point)
    assert unpack(rest, stage, resume=(point.disk, point.offset)) == m
    assert_same_disks(big_delta, stage, m)
    received = len(cut_at(wire, keep))
    # Resent: what arrived but had not reached the file yet, at most one chunk (a block being
    # decompressed, the receiver's last batch), plus the manifest again.
    assert len(rest) + received - len(wire) <= CHUNK + 4096


def test_a_kept_part_changed_on_disk_fails_the_hash_and_is_dropped(
    big_delta: Path, tmp_path: Path
) -> None:
    m = manifest_of(big_delta, "none")
    wire = pack(big_delta, m)
    stage = tmp_path / "stage"
    with pytest.raises(StreamCut):
        unpack(cut_at(wire, 0.6), stage)
    point = delta_resume.load(stage)
    assert point is not None and point.offset > 0
    part = stage / f"disk{point.disk}.qcow2.part"
    data = bytearray(part.read_bytes())
    data[point.offset // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="hash mismatch"):
        unpack(pack(big_delta, m, start=point), stage, resume=(point.disk, point.offset))
    assert staged_nothing(stage)


def test_a_resume_the_replica_does_not_hold_is_refused(big_delta: Path, tmp_path: Path) -> None:
    m = manifest_of(big_delta, "zstd")
    stage = tmp_path / "stage"
    with pytest.raises(IntegrityError, match="holds no such cut stream"):
        unpack(pack(big_delta, m), stage, resume=(0, 4096))
    with pytest.raises(StreamCut):
        unpack(cut_at(pack(big_delta, m), 0.5), stage)
    point = delta_resume.load(stage)
    assert point is not None
    other = manifest_of(big_delta, "zstd", sequence=6)  # another delta, same files
    with pytest.raises(IntegrityError, match="holds no such cut stream"):
        unpack(pack(big_delta, other, start=point), stage, resume=(point.disk, point.offset))


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_trailing_garbage_is_refused(small_delta: Path, tmp_path: Path, compression: str) -> None:
    wire = pack(small_delta, manifest_of(small_delta, compression)) + b"x"
    stage = tmp_path / "stage"
    with pytest.raises(IntegrityError, match="unexpected data after the last disk"):
        unpack(wire, stage, 1 << 20)
    assert staged_nothing(stage)


def test_bad_magic_is_refused(small_delta: Path, tmp_path: Path) -> None:
    wire = pack(small_delta, manifest_of(small_delta, "none"))
    with pytest.raises(IntegrityError, match="bad magic"):
        unpack(b"VMRD2\n" + wire[6:], tmp_path / "stage")
    with pytest.raises(IntegrityError, match="bad magic"):
        unpack(b"", tmp_path / "stage")
    assert staged_nothing(tmp_path / "stage")


def test_wrong_vm_is_refused_before_anything_is_written(small_delta: Path, tmp_path: Path) -> None:
    wire = pack(small_delta, manifest_of(small_delta, "zstd"))
    called: list[DeltaManifest] = []
    with pytest.raises(IntegrityError, match="sent to the replication of VM other"):
        unpack(wire, tmp_path / "stage", vm_id="other", check_manifest=called.append)
    assert not (tmp_path / "stage").exists() and not called


def test_check_manifest_refusal_writes_nothing(small_delta: Path, tmp_path: Path) -> None:
    wire = pack(small_delta, manifest_of(small_delta, "zstd", sequence=9))
    stage = tmp_path / "stage"

    def want_sequence_8(m: DeltaManifest) -> None:
        assert not stage.exists()  # the hook runs before the staging directory is created
        if m.sequence != 8:
            raise InvalidState(f"delta {m.sequence} out of sequence: expected 8")

    with pytest.raises(InvalidState, match="out of sequence"):
        unpack(wire, stage, check_manifest=want_sequence_8)
    assert not stage.exists()


def test_disk_over_max_file_size_is_refused(big_delta: Path, tmp_path: Path) -> None:
    wire = pack(big_delta, manifest_of(big_delta, "zstd"))
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        unpack(wire, tmp_path / "stage", max_file_size=1 << 20)
    assert not (tmp_path / "stage").exists()


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_more_data_than_announced_is_refused(
    tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest that understates a disk: the receiver stops at once instead of filling disk."""
    src = make_disks(tmp_path / "d", {0: bytes(8 << 20)})
    m = manifest_of(src, compression)
    wire = pack(src, m)
    first_mib = replace(
        m.disks[0], file_size=1 << 20, blake3=blake3.blake3(bytes(1 << 20)).hexdigest()
    )
    lie = replace(m, disks=(first_mib,)).to_json().encode()
    forged = delta.MAGIC + len(lie).to_bytes(4, "big") + lie + wire[10 + len(m.to_json()) :]
    written: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    stage = tmp_path / "stage"
    with pytest.raises(IntegrityError, match=r"larger than announced|unexpected data"):
        unpack(forged, stage, 1 << 20)
    assert sum(written) <= 1 << 20
    assert staged_nothing(stage)


def test_non_empty_staging_is_left_alone(small_delta: Path, tmp_path: Path) -> None:
    stage = make_disks(tmp_path / "stage", {0: b"previous delta"})
    with pytest.raises(InvalidState, match="still holds another delta"):
        unpack(pack(small_delta, manifest_of(small_delta, "none")), stage)
    assert (stage / "disk0.qcow2").read_bytes() == b"previous delta"


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_disk_full_while_staging(
    big_delta: Path, tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = pack(big_delta, manifest_of(big_delta, compression))
    stage = tmp_path / "stage"
    real_write, room = os.write, [4 << 20]

    def write_until_full(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(stage)):
            if len(data) > room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_until_full)
    with pytest.raises(
        StorageError, match=r"^disk full while staging delta 5 of VM vm-0001: .*No space"
    ):
        unpack(wire, stage)
    assert staged_nothing(stage)


def test_not_enough_free_space_is_refused_up_front(
    small_delta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = pack(small_delta, manifest_of(small_delta, "none"))
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=90, free=10)
    )
    with pytest.raises(StorageError, match=r"disk full while staging delta 5.*bytes needed"):
        unpack(wire, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


def test_cancelled_receive_cleans_up(big_delta: Path, tmp_path: Path) -> None:
    wire = pack(big_delta, manifest_of(big_delta, "none"))
    stage = tmp_path / "stage"

    async def stalls() -> AsyncIterator[bytes]:
        yield wire[: len(wire) // 2]
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(receive(stalls(), stage, expected_vm_id=VM))
        while not list(stage.glob("*.part")):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert staged_nothing(stage)


def test_sender_refuses_a_file_that_changed(big_delta: Path) -> None:
    m = manifest_of(big_delta, "zstd")
    with (big_delta / "disk0.qcow2").open("ab") as f:
        f.write(b"late write")
    with pytest.raises(IntegrityError, match="changed size"):
        pack(big_delta, m)


# --- restart ----------------------------------------------------------------------------------


def test_stage_is_complete_detects_damage(big_delta: Path, tmp_path: Path) -> None:
    m = manifest_of(big_delta, "zstd")
    stage = tmp_path / "stage"
    unpack(pack(big_delta, m), stage)
    assert stage_is_complete(stage) == m
    with (stage / "disk4.qcow2").open("r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    assert stage_is_complete(stage) is None
    shutil.rmtree(stage)  # how the replica discards a stage
    assert stage_is_complete(stage) is None


def test_stage_without_manifest_is_incomplete(big_delta: Path, tmp_path: Path) -> None:
    m = manifest_of(big_delta, "none")
    stage = tmp_path / "stage"
    unpack(pack(big_delta, m), stage)
    (stage / MANIFEST).unlink()  # as if the crash came before the last step
    assert stage_is_complete(stage) is None
