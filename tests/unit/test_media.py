"""Offline media (transport/media.py): the manifest's strict parsing, and a copy off the media
that leaves nothing behind unless it is exactly the file the manifest names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import blake3
import pytest

from vmreplica._internal.transport import media
from vmreplica.errors import IntegrityError, InvalidArgument

VM = "2f1c7a34-5b7e-4c1e-9a55-0d4be3c7c001"


def manifest_for(data: bytes) -> media.MediaManifest:
    disk = media.MediaDisk(0, 1 << 20, len(data), blake3.blake3(data).hexdigest())
    return media.MediaManifest(VM, "app", "vmhost2", "2026-11-30T00:00:00+00:00", (disk,))


def test_manifest_round_trips_through_its_file(tmp_path: Path) -> None:
    written = manifest_for(b"x" * 1000)
    media.write_manifest(tmp_path, written)
    assert media.read_manifest(tmp_path) == written
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "tar"}, "not vmreplica initial media"),
        ({"version": 2}, "not vmreplica initial media"),
        ({"vm_id": "../../etc"}, "vm_id"),
        ({"disks": []}, "must list the disks"),
        ({"disks": [{"index": 1, "virtual_size": 1, "file_size": 1, "blake3": "0" * 64}]},
         "out of order"),
        ({"disks": [{"index": 0, "virtual_size": 1, "file_size": 1, "blake3": "xyz"}]},
         "64 hex digits"),
        ({"disks": [{"index": 0, "virtual_size": -1, "file_size": 1, "blake3": "0" * 64}]},
         "virtual_size"),
    ],
)  # fmt: skip
def test_a_damaged_manifest_is_refused_with_its_reason(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    data = {**manifest_for(b"x").to_json(), **change}
    (tmp_path / media.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=message):
        media.read_manifest(tmp_path)


def test_no_manifest_is_not_media(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"holds no manifest\.json"):
        media.read_manifest(tmp_path)
    (tmp_path / media.MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="is damaged"):
        media.read_manifest(tmp_path)


def test_copy_verified_takes_only_the_named_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    expected = manifest_for(data).disks[0]
    source, dest = tmp_path / "disk0.qcow2", tmp_path / "copy.qcow2"
    source.write_bytes(data)
    media.copy_verified(source, dest, expected)
    assert dest.read_bytes() == data
    for damaged, reason in (
        (data[:-1], "shorter"),
        (data + b"!", "larger"),
        (data[:100] + bytes([data[100] ^ 1]) + data[101:], "blake3"),
    ):
        source.write_bytes(damaged)
        dest.unlink(missing_ok=True)
        with pytest.raises(IntegrityError, match=reason):
            media.copy_verified(source, dest, expected)
        assert not dest.exists()
    source.unlink()
    with pytest.raises(IntegrityError, match="missing from the media"):
        media.copy_verified(source, dest, expected)
    assert not dest.exists()


def test_media_files_must_be_regular_files(tmp_path: Path) -> None:
    """Media is not trusted: a manifest that never ends (a link to /dev/zero) is not read into
    memory, a FIFO does not block, an oversized manifest is refused unread."""
    (tmp_path / media.MANIFEST).symlink_to("/dev/zero")
    with pytest.raises(IntegrityError, match="not a regular file"):
        media.read_manifest(tmp_path)
    (tmp_path / media.MANIFEST).unlink()
    os.mkfifo(tmp_path / media.MANIFEST)
    with pytest.raises(IntegrityError, match="not a regular file"):
        media.read_manifest(tmp_path)
    (tmp_path / media.MANIFEST).unlink()
    (tmp_path / media.MANIFEST).write_bytes(b" " * (media.MAX_MANIFEST + 1))
    with pytest.raises(IntegrityError, match="larger than"):
        media.read_manifest(tmp_path)
    data = b"x" * 1000
    os.mkfifo(tmp_path / "disk0.qcow2")
    with pytest.raises(IntegrityError, match="not a regular file"):
        media.copy_verified(
            tmp_path / "disk0.qcow2", tmp_path / "copy", manifest_for(data).disks[0]
        )
    assert not (tmp_path / "copy").exists()
