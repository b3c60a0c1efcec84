"""The old primary's disk moves of a reverse are durable: each rename's directories are synced
before the record (or the journal's end) relies on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmreplica._internal import files
from vmreplica._internal.engine.failover import old_primary


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    synced: list[Path] = []
    real = files.fsync_dir

    def record(path: Path) -> None:
        real(path)
        synced.append(path)

    monkeypatch.setattr(old_primary, "fsync_dir", record)
    return synced


def _layout(tmp_path: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """The VM's disks directory, the chains' root of a reverse, and the one disk's move."""
    disks = tmp_path / "disks"
    root = tmp_path / "replicas" / "web" / "rev-1"
    disks.mkdir()
    (root / "0").mkdir(parents=True)
    return disks, root, [(str(disks / "web.qcow2"), str(root / "0" / "base.qcow2"))]


def test_the_moves_into_the_chains_sync_both_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _recording(monkeypatch)
    disks, root, moves = _layout(tmp_path)
    (disks / "web.qcow2").write_bytes(b"x")
    (disks / "web.qcow2").replace(root / "0" / "base.qcow2")
    old_primary._sync_moves(moves, root)
    for path in (disks, root / "0", root, root.parent, root.parent.parent):
        assert path in synced, (path, synced)


def test_moving_back_syncs_the_disks_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _recording(monkeypatch)
    disks, root, moves = _layout(tmp_path)
    (root / "0" / "base.qcow2").write_bytes(b"x")
    old_primary._move_back(moves, root)
    assert (disks / "web.qcow2").read_bytes() == b"x" and not root.exists()
    assert disks in synced, synced
