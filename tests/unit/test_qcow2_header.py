"""The qcow2 header reader (drivers/qemu/qcow2_header.py) on hand-made headers, hostile ones
included. Its agreement with qemu-img on real images is in tests/integration/test_bad_deltas.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmreplica._internal.drivers.qemu import qcow2_header as q

SIZE = 64 << 20


def image(
    *,
    magic: bytes = q.MAGIC,
    version: int = 3,
    cluster_bits: int = 16,
    size: int = SIZE,
    crypt: int = 0,
    snapshots: int = 0,
    incompat: int = 0,
    refcount_order: int = 4,
    l1: tuple[int, int] = (3 << 16, 8),
    refcount: tuple[int, int] = (1 << 16, 1),
    snapshots_offset: int = 0,
    autoclear: int = 0,
    header_length: int = 112,
    compression: int = 0,
    backing: bytes | None = None,
    backing_offset: int | None = None,
    extensions: tuple[tuple[int, bytes], ...] = ((0x6803F857, b"\0" * 48),),
    cut: int | None = None,
) -> bytes:
    """The first cluster of a qcow2 image as qemu-img 7.2 lays it out: header, extensions,
    end marker, backing name; ``cut`` truncates the file."""
    length = q.V2_LENGTH if version == 2 else header_length
    ext = b"".join(struct.pack(">II", m, len(d)) + d + b"\0" * (-len(d) % 8) for m, d in extensions)
    ext += struct.pack(">II", q.EXT_END, 0)
    name_at = (
        (backing_offset if backing_offset is not None else length + len(ext)) if backing else 0
    )
    head = magic + struct.pack(">IQII", version, name_at, len(backing or b""), cluster_bits)
    head += struct.pack(">QIIQQIIQ", size, crypt, l1[1], l1[0], *refcount, snapshots,
                        snapshots_offset)  # fmt: skip
    if version != 2:
        head += struct.pack(">QQQII", incompat, 0, autoclear, refcount_order, header_length)
        head += bytes([compression]) + b"\0" * (header_length - q.V3_LENGTH - 1)
    data = bytearray((head + ext).ljust(1 << 16, b"\0"))
    if backing:
        data[name_at : name_at + len(backing)] = backing
    return bytes(data[:cut] if cut is not None else data)


def read(tmp_path: Path, data: bytes) -> q.Qcow2Header:
    path = tmp_path / "delta.qcow2"
    path.write_bytes(data)
    return q.read(path)


def test_a_plain_v3_delta(tmp_path: Path) -> None:
    assert read(tmp_path, image()) == q.Qcow2Header(3, SIZE, 1 << 16, None)


def test_v2_and_a_backing_name_and_sector_rounding(tmp_path: Path) -> None:
    header = read(tmp_path, image(version=2, size=SIZE + 100, backing=b"/x/tip.qcow2"))
    assert header == q.Qcow2Header(2, SIZE, 1 << 16, "/x/tip.qcow2")
    assert read(tmp_path, image(backing=b"tip.qcow2")).backing == "tip.qcow2"


def test_a_file_shorter_than_a_cluster_reads_as_zero_padded(tmp_path: Path) -> None:
    assert read(tmp_path, image(cut=512)).virtual_size == SIZE


_FEATURES = struct.pack(">II", 0x6803F857, 8)
_TOO_LARGE = image(extensions=((0x6803F857, b"\0" * 8),)).replace(
    _FEATURES, struct.pack(">II", 0x6803F857, 1 << 20), 1
)

HOSTILE = [
    ("empty", image(cut=0), "no qcow2 magic"),
    ("truncated v3", image(cut=80), "truncated qcow2 header"),
    ("truncated v2", image(version=2, cut=60), "truncated qcow2 header"),
    ("wrong magic", image(magic=b"QFI\0"), "no qcow2 magic"),
    ("raw zeros", b"\0" * 4096, "no qcow2 magic"),
    ("version 1", image(version=1), "unsupported qcow2 version 1"),
    ("version 4", image(version=4), "unsupported qcow2 version 4"),
    ("tiny clusters", image(cluster_bits=8), "invalid cluster_bits 8"),
    ("huge clusters", image(cluster_bits=22), "invalid cluster_bits 22"),
    ("short header_length", image(header_length=96), "invalid header_length 96"),
    ("odd header_length", image(header_length=108), "invalid header_length 108"),
    ("refcount order", image(refcount_order=7), "invalid refcount_order 7"),
    ("dirty", image(incompat=1), "not closed cleanly"),
    ("compression type bit", image(incompat=1 << 3, compression=1), "features 0x8"),
    ("extended L2", image(incompat=1 << 4), "features 0x10"),
    ("unknown bit", image(incompat=1 << 63), "features 0x8000000000000000"),
    ("zstd without its bit", image(compression=1), "compression type 1"),
    ("AES encrypted", image(crypt=1), "encrypted (crypt_method 1)"),
    ("LUKS encrypted", image(crypt=2), "encrypted (crypt_method 2)"),
    ("encryption header", image(extensions=((q.EXT_CRYPTO, b"\0" * 16),)), "encryption header"),
    ("snapshots", image(snapshots=2), "2 internal snapshots"),
    ("backing past the cluster", image(backing=b"x", backing_offset=1 << 16), "backing file"),
    ("backing name too long", image(backing=b"a" * 1024), "backing file"),
    ("backing not UTF-8", image(backing=b"\xff\xfe"), "not UTF-8"),
    ("backing with NUL", image(backing=b"a\0b"), "invalid backing file name"),
    ("extension too large", _TOO_LARGE, "header extension too large"),
    # What QEMU 7.2's qcow2_do_open checks of the tables the header points at.
    ("too big", image(cluster_bits=9, size=1 << 60), "image is too big"),
    ("L1 too large", image(l1=(3 << 16, (1 << 22) + 1)), "active L1 table too large"),
    ("L1 too small", image(l1=(3 << 16, 0)), "L1 table is too small"),
    ("L1 misaligned", image(l1=(3 << 16 | 8, 8)), "active L1 table offset invalid"),
    ("L1 past 2^63", image(l1=((1 << 63) - (1 << 16), 1 << 20)), "L1 table offset invalid"),
    ("refcounts too large", image(refcount=(1 << 16, 129)), "refcount table too large"),
    ("no refcount table", image(refcount=(1 << 16, 0)), "no refcount table"),
    ("refcounts misaligned", image(refcount=(1 << 16 | 512, 1)), "refcount table offset invalid"),
    ("snapshots misaligned", image(snapshots_offset=4096), "snapshot table offset invalid"),
    ("data-file-raw alone", image(autoclear=2), "data-file-raw without an external data file"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in HOSTILE],
                         ids=[n for n, _, _ in HOSTILE])  # fmt: skip
def test_hostile_headers_are_refused_in_one_line(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(q.HeaderError) as refused:
        read(tmp_path, data)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "data",
    [
        image(incompat=1 << 1),
        image(incompat=1 << 2),
        image(incompat=(1 << 2) | (1 << 1)),
        image(extensions=((q.EXT_DATA_FILE, b"/etc/shadow"),)),
    ],
    ids=["corrupt bit", "data file bit", "both", "data file name without the bit"],
)
def test_corrupt_or_external_data_file_is_its_own_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(q.DataFileError):
        read(tmp_path, data)


def test_tables_at_their_limits_are_read(tmp_path: Path) -> None:
    """An L1 table just large enough (64 MiB at 64 KiB clusters: one 8-byte entry), or the
    largest QEMU opens, and the largest refcount table, as QEMU 7.2 accepts them."""
    assert read(tmp_path, image(l1=(3 << 16, 1))).virtual_size == SIZE
    assert read(tmp_path, image(l1=(3 << 16, 1 << 22))).virtual_size == SIZE
    assert read(tmp_path, image(refcount=(1 << 16, 128))).virtual_size == SIZE
    assert read(tmp_path, image(version=2, snapshots_offset=0)).version == 2


def test_unknown_header_extensions_are_skipped_as_qemu_does(tmp_path: Path) -> None:
    exts = ((0xE2792ACA, b"qcow2"), (0x23852875, b"\0" * 24), (0x01020304, b"abc"))
    assert read(tmp_path, image(extensions=exts)).virtual_size == SIZE


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        q.read(tmp_path / "none.qcow2")
