"""The fields of a qcow2 header that decide whether a delta may be applied, read in Python.

``qemu-img info`` costs a process (about 10 ms of CPU) for what is a few bytes at the start of
the file, and the replica read every delta's header twice per cycle (issue 14). This reads the
same fields as QEMU 7.2's ``qcow2_do_open`` does (docs/interop/qcow2.txt) and is strict: any
header that QEMU would refuse, or that uses a feature a delta never has (encryption, an external
data file, internal snapshots, the dirty or corrupt bit, compression other than zlib, extended
L2 entries, unknown incompatible bits), raises :class:`HeaderError`; so does a size or place of
the L1, refcount or snapshot table that QEMU refuses before it reads them. It reads no table:
``qemu-img check`` still vets the metadata of every received delta once.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
SECTOR = 512
V2_LENGTH = 72
V3_LENGTH = 104
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
EXT_END = 0
EXT_DATA_FILE = 0x44415441
EXT_CRYPTO = 0x0537BE77
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21
_MAX_BACKING_NAME = 1023
_MAX_L1_BYTES, _MAX_REFTABLE_BYTES = 32 << 20, 8 << 20  # QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE
_INT64_MAX, _INT_MAX = (1 << 63) - 1, (1 << 31) - 1
_FIELDS = struct.Struct(">4sIQIIQIIQQIIQ")  # up to snapshots_offset: 72 bytes
_V3_FIELDS = struct.Struct(">QQQII")  # incompatible .. header_length: 32 bytes


class HeaderError(ValueError):
    """Not a qcow2 header, or one a delta may not have; the message says which, in one line."""


class DataFileError(HeaderError):
    """The image keeps its data in an external file, or its corrupt bit is set."""


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    virtual_size: int
    """In whole sectors, as ``qemu-img info`` reports it (QEMU drops a trailing partial one)."""
    cluster_size: int
    backing: str | None
    """The backing file name exactly as stored (relative names are relative to the image)."""


def read(path: str | os.PathLike[str]) -> Qcow2Header:
    """The header of the qcow2 image at ``path``; HeaderError unless it is one a delta may have.

    OSError passes through (missing file, I/O error)."""
    with open(path, "rb") as f:
        head = f.read(V3_LENGTH)
        if len(head) < 8 or head[:4] != MAGIC:
            raise HeaderError("not a qcow2 image (no qcow2 magic)")
        version = int.from_bytes(head[4:8], "big")
        if version not in (2, 3):
            raise HeaderError(f"unsupported qcow2 version {version}")
        if len(head) < (V2_LENGTH if version == 2 else V3_LENGTH):
            raise HeaderError("truncated qcow2 header")
        (_, _, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
         refcount_offset, refcount_clusters, snapshots, snapshots_offset,
         ) = _FIELDS.unpack_from(head)  # fmt: skip
        if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
            raise HeaderError(f"invalid cluster_bits {cluster_bits}")
        cluster_size = 1 << cluster_bits
        f.seek(0)
        first = f.read(cluster_size).ljust(cluster_size, b"\0")  # QEMU reads past EOF as zeros
    header_length = V2_LENGTH
    if version == 3:
        incompat, _, autoclear, refcount_order, header_length = _V3_FIELDS.unpack_from(
            head, V2_LENGTH
        )
        if not V3_LENGTH <= header_length <= cluster_size or header_length % 8:
            raise HeaderError(f"invalid header_length {header_length}")
        if refcount_order > 6:
            raise HeaderError(f"invalid refcount_order {refcount_order}")
        if incompat & INCOMPAT_DIRTY:
            raise HeaderError("the image was not closed cleanly (dirty bit set)")
        if incompat & (INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE):
            raise DataFileError("corrupt bit or external data file bit set")
        if incompat:
            raise HeaderError(f"uses incompatible qcow2 features {incompat:#x}")
        if header_length > V3_LENGTH and first[V3_LENGTH] != 0:
            raise HeaderError(f"uses compression type {first[V3_LENGTH]}, not zlib")
        if autoclear & AUTOCLEAR_DATA_FILE_RAW:  # QEMU refuses it without a data file
            raise HeaderError("sets data-file-raw without an external data file")
    if crypt != 0:
        raise HeaderError(f"is encrypted (crypt_method {crypt})")
    if snapshots != 0:
        raise HeaderError(f"has {snapshots} internal snapshots")
    _check_tables(cluster_bits, size, (l1_offset, l1_size), (refcount_offset, refcount_clusters),
                  snapshots_offset)  # fmt: skip
    backing = None
    if backing_offset != 0:
        if backing_size > _MAX_BACKING_NAME or backing_offset + backing_size > cluster_size:
            raise HeaderError("invalid backing file name field")
        raw = first[backing_offset : backing_offset + backing_size]
        try:
            backing = raw.decode()
        except UnicodeDecodeError as exc:
            raise HeaderError("backing file name is not UTF-8") from exc
        if not backing or "\0" in backing:
            raise HeaderError("invalid backing file name")
    _check_extensions(first, header_length, backing_offset or cluster_size)
    return Qcow2Header(version, size // SECTOR * SECTOR, cluster_size, backing)


def _check_tables(
    cluster_bits: int, size: int, l1: tuple[int, int], refcounts: tuple[int, int],
    snapshots_offset: int,
) -> None:  # fmt: skip
    """What QEMU 7.2's qcow2_do_open checks of the tables the header points at (their size
    and place: qcow2_validate_table), before it reads any: refused here as it would be there,
    rather than as the replica's own storage failing when qemu-img cannot open the delta."""
    cluster_size = 1 << cluster_bits

    def place(name: str, offset: int, length: int) -> None:
        if offset > _INT64_MAX - length or offset % cluster_size:
            raise HeaderError(f"{name} offset invalid")

    refcount_offset, refcount_clusters = refcounts
    if refcount_clusters > _MAX_REFTABLE_BYTES >> cluster_bits:
        raise HeaderError("refcount table too large")
    if refcount_clusters == 0:
        raise HeaderError("has no refcount table")
    place("refcount table", refcount_offset, refcount_clusters * cluster_size)
    place("snapshot table", snapshots_offset, 0)  # no snapshots (refused above)
    l1_offset, l1_size = l1
    if l1_size > _MAX_L1_BYTES // 8:
        raise HeaderError("active L1 table too large")
    place("active L1 table", l1_offset, l1_size * 8)
    needed = -(-size // (1 << (2 * cluster_bits - 3)))  # L2 tables of 8-byte entries
    if needed > _INT_MAX:
        raise HeaderError("image is too big")
    if l1_size < needed:
        raise HeaderError("L1 table is too small")


def _check_extensions(first: bytes, offset: int, end: int) -> None:
    """Walk the header extensions as QEMU does; refuse a data file or an encryption header."""
    while offset < end:
        if offset + 8 > end:
            raise HeaderError("truncated header extension")
        magic, length = struct.unpack_from(">II", first, offset)
        offset += 8
        if length > end - offset:
            raise HeaderError("header extension too large")
        if magic == EXT_END:
            return
        if magic == EXT_DATA_FILE:
            raise DataFileError("names an external data file")
        if magic == EXT_CRYPTO:
            raise HeaderError("has an encryption header")
        offset += (length + 7) & ~7
