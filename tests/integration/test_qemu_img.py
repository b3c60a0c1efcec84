"""The qemu-img wrapper against the real tool: results, exit statuses and error mapping."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fault import tmpfs
from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica.errors import InvalidArgument, InvalidState, StorageError

MiB = 1 << 20
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def qio(path: Path, *commands: str) -> None:
    args = [arg for c in commands for arg in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(path)], check=True, capture_output=True)


def reads(path: Path, pattern: int, offset: str, length: str) -> bool:
    cmd = ["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def corrupt(path: Path) -> None:
    """Point the first data cluster at the L1 table, so two owners share one cluster."""
    with open(path, "r+b") as f:
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | l1))


def test_create_info_and_virtual_size(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(qemu_img.create(base, 4 * MiB))
    run(qemu_img.create(top, None, backing="base.qcow2"))
    info = run(qemu_img.info(top))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 4 * MiB
    assert info["backing-filename"] == "base.qcow2"
    assert Path(info["full-backing-filename"]) == base
    assert run(qemu_img.virtual_size(top)) == 4 * MiB
    chain = run(qemu_img.info_chain(top))
    assert [Path(i["filename"]) for i in chain] == [top, base]
    assert "backing-filename" not in chain[1]


def test_create_rejects_missing_size(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        run(qemu_img.create(tmp_path / "x.qcow2", None))
    with pytest.raises(InvalidArgument):
        run(qemu_img.create(tmp_path / "x.qcow2", 0))
    assert not (tmp_path / "x.qcow2").exists()


def test_path_that_looks_like_an_option_or_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("-odd.qcow2", "nbd:odd.qcow2"):
        run(qemu_img.create(name, MiB))
        assert (tmp_path / name).is_file()
        assert run(qemu_img.virtual_size(name)) == MiB


def test_compare_check_convert_and_map(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    run(qemu_img.create(a, 2 * MiB))
    qio(a, "write -P 0x11 0 64k", "write -z 1M 64k")
    run(qemu_img.convert(a, b))
    assert run(qemu_img.compare(a, b)) is True
    qio(b, "write -P 0x22 64k 64k")
    assert run(qemu_img.compare(a, b)) is False
    run(qemu_img.convert(a, c, compress=True))
    assert run(qemu_img.compare(a, c)) is True
    assert run(qemu_img.check(a)) is None

    extents = run(qemu_img.map(a))
    assert extents[0].start == 0 and extents[0].length == 64 * 1024
    assert extents[0].data and not extents[0].zero and extents[0].offset is not None
    zero = next(e for e in extents if e.start == MiB)
    assert zero.zero and not zero.data and zero.present and zero.depth == 0
    assert sum(e.length for e in extents) == 2 * MiB


def test_check_reports_corruption(tmp_path: Path) -> None:
    img = tmp_path / "bad.qcow2"
    run(qemu_img.create(img, MiB))
    qio(img, "write -P 0x11 0 64k")
    corrupt(img)
    problem = run(qemu_img.check(img))
    assert problem is not None and "1 corruptions" in problem


def test_commit_keeps_top_unless_asked(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(qemu_img.create(base, MiB))
    qio(base, "write -P 0x11 0 128k")
    run(qemu_img.create(top, None, backing=base))
    qio(top, "write -P 0x22 0 64k", "write -z 64k 64k")
    run(qemu_img.commit(top))
    assert reads(base, 0x22, "0", "64k") and reads(base, 0, "64k", "64k")
    assert all(e.depth == 0 for e in run(qemu_img.map(top)) if e.start < 128 * 1024)
    run(qemu_img.commit(top, empty_top=True))
    assert all(e.depth == 1 for e in run(qemu_img.map(top)))
    assert reads(top, 0x22, "0", "64k")


def test_rebase_safe_keeps_content_unsafe_does_not(tmp_path: Path) -> None:
    base, top, other = (tmp_path / n for n in ("base.qcow2", "top.qcow2", "other.qcow2"))
    run(qemu_img.create(base, MiB))
    qio(base, "write -P 0x11 0 64k")
    run(qemu_img.create(other, MiB))
    run(qemu_img.create(top, None, backing=base))
    run(qemu_img.rebase(top, other.name))
    assert run(qemu_img.info(top))["backing-filename"] == "other.qcow2"
    assert reads(top, 0x11, "0", "64k")
    run(qemu_img.rebase_unsafe(top, None))
    assert "backing-filename" not in run(qemu_img.info(top))
    assert reads(top, 0x11, "0", "64k")
    top2 = tmp_path / "top2.qcow2"
    run(qemu_img.create(top2, None, backing=base))
    run(qemu_img.rebase_unsafe(top2, other))
    assert reads(top2, 0, "0", "64k")


def test_bitmaps_and_flags(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    run(qemu_img.create(img, MiB))
    assert run(qemu_img.bitmaps(img)) == []
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "rec"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "--disable", str(img), "off"], check=True)
    found = {b.name: b for b in run(qemu_img.bitmaps(img))}
    assert found["rec"].flags == {"auto"} and found["rec"].granularity == 64 * 1024
    assert found["off"].flags == frozenset()
    assert not found["rec"].in_use


def test_missing_image_is_a_storage_error_with_qemu_message(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        run(qemu_img.info(tmp_path / "nope.qcow2"))
    message = str(err.value)
    assert "\n" not in message
    assert "nope.qcow2" in message and "No such file or directory" in message


def _locked(image: Path, byte: int) -> bool:
    """A process holds QEMU's lock byte ``byte`` of ``image`` (its /proc/locks line ends with
    the inode and the byte range)."""
    inode = f":{image.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-3].endswith(inode) and fields[-2] == str(byte):
            return True
    return False


@pytest.fixture
def held_overlay(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A qemu-io process holds an overlay open, as a failover VM would; it is reaped after."""
    base, overlay = tmp_path / "base.qcow2", tmp_path / "ov.qcow2"
    run(qemu_img.create(base, MiB))
    run(qemu_img.create(overlay, None, backing=base))
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(overlay)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait for QEMU's locks to show in /proc/locks; probing by opening the image would race
        # with the holder's own open. QEMU locks the overlay first and its backing file after
        # (a window strace shows): what the tests rely on is the base's "write not shared"
        # byte (200 + WRITE's bit 1), so wait for that one, not just any lock on the overlay.
        deadline = time.monotonic() + 10
        while not (_locked(overlay, 201) and _locked(base, 201)):
            assert holder.poll() is None, "qemu-io exited"
            assert time.monotonic() < deadline, "qemu-io never locked the overlay and its base"
            time.sleep(0.02)
        yield base, overlay
    finally:
        holder.kill()
        holder.wait()


def test_lock_conflict_is_invalid_state(held_overlay: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = held_overlay
    other = tmp_path / "other.qcow2"
    run(qemu_img.create(other, None, backing=base))
    qio(other, "write -P 0x33 0 64k")
    with pytest.raises(InvalidState) as err:
        run(qemu_img.commit(other))
    assert "in use" in str(err.value) and "lock" in str(err.value)
    # Reads with shared access still work on an image a running QEMU holds.
    assert run(qemu_img.virtual_size(base)) == MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "1M") as mnt:
        yield mnt


def test_disk_full_is_named(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "src.qcow2"
    run(qemu_img.create(src, 64 * MiB))
    qio(src, "write -P 0x11 0 4M")
    with pytest.raises(StorageError) as err:
        run(qemu_img.convert(src, small_fs / "copy.qcow2"))
    assert str(err.value).startswith("disk full: ")
    assert "No space left on device" in str(err.value)


@pytest.mark.parametrize("size", [512, 1 << 20, 3 * (1 << 30) + 4096, 1 << 40])
def test_header_virtual_size_is_what_qemu_img_info_says(tmp_path: Path, size: int) -> None:
    image = tmp_path / "a.qcow2"
    run(qemu_img.create(image, size))
    assert qemu_img.header_virtual_size(image) == run(qemu_img.virtual_size(image)) == size
    over = tmp_path / "b.qcow2"
    run(qemu_img.create(over, None, image))  # with a backing file: still its own header
    assert qemu_img.header_virtual_size(over) == run(qemu_img.virtual_size(over)) == size


def test_header_virtual_size_rounds_down_to_sectors_as_qemu_does(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    run(qemu_img.create(image, 1 << 20))
    with image.open("r+b") as f:  # a header size no qemu-img writes: 1 MiB + 100 bytes
        f.seek(24)
        f.write(struct.pack(">Q", (1 << 20) + 100))
    assert qemu_img.header_virtual_size(image) == run(qemu_img.virtual_size(image)) == 1 << 20


def test_header_virtual_size_refuses_what_is_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 4096)
    for path in (raw, tmp_path / "missing"):
        with pytest.raises(StorageError, match="qemu-img info"):
            qemu_img.header_virtual_size(path)
    short = tmp_path / "short"
    short.write_bytes(b"QFI\xfb\0\0\0\x03")
    with pytest.raises(StorageError, match="not a qcow2 image"):
        qemu_img.header_virtual_size(short)
