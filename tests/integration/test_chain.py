"""The replica chain with real qemu-img: content of tip and of every point, and crash recovery.

A "cycle" writes the same qemu-io commands into a source image (the primary's disk) and into a
fresh standalone qcow2 (the delta), which holds only the changed clusters, zero clusters
included, as a ``blockdev-backup sync=incremental`` target does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import struct
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fault import tmpfs
from vmreplica._internal.drivers.qemu import qemu_img
from vmreplica._internal.drivers.qemu.chain import PENDING, ReplicaChain
from vmreplica.errors import IntegrityError, InvalidArgument, InvalidState, NotFound, StorageError

SIZE = 4 << 20
T = TypeVar("T")

CYCLES = [
    ["write -P 0x11 0 256k", "write -P 0x12 1M 64k"],
    ["write -P 0x21 64k 64k", "write -z 1M 64k", "write -P 0x22 3M 128k"],
    ["write -P 0x31 0 64k", "write -P 0x32 2M 64k"],
    ["write -z 0 128k", "write -P 0x41 3M 64k"],
    ["write -P 0x51 192k 64k"],
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def qio(path: Path, *commands: str) -> None:
    args = [arg for c in commands for arg in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(path)], check=True, capture_output=True)


def reads(path: Path, pattern: int, offset: str, length: str) -> bool:
    cmd = ["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def same(a: Path, b: Path) -> bool:
    return run(qemu_img.compare(a, b))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Primary:
    """The primary's disk and a delta per cycle; ``snapshot`` keeps a point-in-time copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src.qcow2"
        self.n = 0
        run(qemu_img.create(self.src, SIZE))

    def cycle(self, commands: list[str]) -> Path:
        self.n += 1
        delta = self.root / f"delta-{self.n}.qcow2"
        run(qemu_img.create(delta, SIZE))
        qio(self.src, *commands)
        qio(delta, *commands)
        return delta

    def snapshot(self, name: str) -> Path:
        copy = self.root / f"snap-{name}.qcow2"
        run(qemu_img.convert(self.src, copy))
        return copy


@pytest.fixture
def primary(tmp_path: Path) -> Primary:
    root = tmp_path / "primary"
    root.mkdir()
    return Primary(root)


@pytest.fixture
def chain(tmp_path: Path) -> ReplicaChain:
    return run(ReplicaChain.create(tmp_path / "replica" / "disk0", SIZE))


def backing_name(path: Path) -> str | None:
    name = run(qemu_img.info(path)).get("backing-filename")
    return None if name is None else str(name)


def with_points(chain: ReplicaChain, primary: Primary, n: int) -> dict[int, Path]:
    """Apply a cycle and freeze a point, n times; then one more cycle into tip."""
    snaps = {}
    for point_id in range(1, n + 1):
        assert run(chain.apply_delta(primary.cycle(CYCLES[point_id - 1])))
        run(chain.freeze_recovery_point(point_id))
        snaps[point_id] = primary.snapshot(str(point_id))
    run(chain.apply_delta(primary.cycle(CYCLES[n])))
    return snaps


def test_create_makes_empty_base_and_tip(chain: ReplicaChain) -> None:
    assert sorted(p.name for p in chain.dir.iterdir()) == ["base.qcow2", "tip.qcow2"]
    assert backing_name(chain.tip) == "base.qcow2"
    assert backing_name(chain.base) is None
    assert run(chain.virtual_size()) == SIZE
    assert reads(chain.tip, 0, "0", "4M")
    assert chain.points() == []
    run(chain.verify())
    with pytest.raises(InvalidState):
        run(ReplicaChain.create(chain.dir, SIZE))


def test_apply_several_deltas_matches_source(chain: ReplicaChain, primary: Primary) -> None:
    for commands in CYCLES:
        delta = primary.cycle(commands)
        assert run(chain.apply_delta(delta)) is True
        assert not delta.exists()
        assert same(primary.src, chain.tip)
    assert reads(chain.tip, 0, "0", "128k")  # zeroed by cycle 4 over data of cycles 1-3
    assert reads(chain.tip, 0x51, "192k", "64k")
    assert reads(chain.tip, 0, "1M", "64k")  # zeroed by cycle 2 over 0x12
    assert reads(chain.tip, 0x41, "3M", "64k") and reads(chain.tip, 0x22, "3136k", "64k")
    assert not (chain.dir / PENDING).exists()
    run(chain.verify())


def test_zero_clusters_of_a_delta_shadow_older_points(
    chain: ReplicaChain, primary: Primary
) -> None:
    run(chain.apply_delta(primary.cycle(["write -P 0x11 0 64k"])))
    run(chain.freeze_recovery_point(1))
    run(chain.apply_delta(primary.cycle(["write -z 0 64k"])))
    assert reads(chain.tip, 0, "0", "64k")
    assert reads(chain.rp_path(1), 0x11, "0", "64k")
    zero = run(qemu_img.map(chain.tip))[0]
    assert zero.depth == 0 and zero.zero and not zero.data  # a zero cluster, not written data


def test_reapplying_the_same_delta_is_harmless(chain: ReplicaChain, primary: Primary) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    copy = delta.with_name("copy.qcow2")
    shutil.copy(delta, copy)
    run(chain.apply_delta(delta))
    run(chain.apply_delta(copy))
    assert same(primary.src, chain.tip)
    run(chain.verify())


def test_rerun_after_an_older_version_crashed_after_rebase(
    chain: ReplicaChain, primary: Primary
) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    run(qemu_img.rebase_unsafe(delta, chain.tip))  # its apply's first step, then it died
    assert run(chain.apply_delta(delta)) is True
    assert same(primary.src, chain.tip)
    assert not delta.exists()


def test_rerun_after_crash_mid_commit(chain: ReplicaChain, primary: Primary) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    qio(chain.tip, "write -P 0x21 64k 64k")  # only the first cluster reached tip
    assert not same(primary.src, chain.tip)
    run(chain.apply_delta(delta))
    assert same(primary.src, chain.tip)


def test_rerun_after_crash_after_commit(chain: ReplicaChain, primary: Primary) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    run(qemu_img.commit_into(delta, chain.tip))  # the apply died before deleting the delta
    assert same(primary.src, chain.tip)
    assert run(chain.apply_delta(delta)) is True
    assert same(primary.src, chain.tip)
    run(chain.verify())


def test_rerun_after_crash_after_delete(chain: ReplicaChain, primary: Primary) -> None:
    delta = primary.cycle(CYCLES[0])
    (chain.dir / PENDING).write_text(f"{delta}\n")
    run(chain.apply_delta(delta))
    # Died after deleting the delta, before clearing the marker: the marker says "applied".
    (chain.dir / PENDING).write_text(f"{delta}\n")
    assert run(chain.apply_delta(delta)) is False
    assert not (chain.dir / PENDING).exists()
    # Died after clearing the marker too: only the caller can say the delta was applied.
    with pytest.raises(NotFound):
        run(chain.apply_delta(delta))
    assert run(chain.apply_delta(delta, missing_ok=True)) is False
    assert same(primary.src, chain.tip)


def test_recover_finishes_a_pending_apply(chain: ReplicaChain, primary: Primary) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    (chain.dir / PENDING).write_text(f"{delta}\n")
    run(qemu_img.rebase_unsafe(delta, chain.tip))
    qio(chain.tip, "write -P 0x22 3M 64k")
    with pytest.raises(IntegrityError, match="half applied"):
        run(chain.verify())
    with pytest.raises(InvalidState, match="half applied"):
        run(chain.freeze_recovery_point(1))
    with pytest.raises(InvalidState, match="half applied"):
        run(chain.apply_delta(primary.cycle(CYCLES[2])))
    assert run(chain.recover()) == [f"finished applying {delta}"]
    assert not delta.exists() and not (chain.dir / PENDING).exists()
    assert not same(primary.src, chain.tip)  # cycle 3 hit the source but was refused
    run(chain.apply_delta(primary.root / "delta-3.qcow2"))
    assert same(primary.src, chain.tip)
    run(chain.verify())


def test_bad_deltas_are_refused(chain: ReplicaChain, tmp_path: Path) -> None:
    wrong_size = tmp_path / "big.qcow2"
    run(qemu_img.create(wrong_size, 2 * SIZE))
    with pytest.raises(IntegrityError, match="bytes"):
        run(chain.apply_delta(wrong_size))
    not_qcow2 = tmp_path / "raw.img"
    not_qcow2.write_bytes(b"\0" * 65536)
    with pytest.raises(IntegrityError, match="not a readable qcow2"):
        run(chain.apply_delta(not_qcow2))
    foreign = tmp_path / "foreign.qcow2"
    run(qemu_img.create(foreign, None, backing=chain.base))
    with pytest.raises(IntegrityError, match="backing"):
        run(chain.apply_delta(foreign))
    with pytest.raises(NotFound):
        run(chain.apply_delta(tmp_path / "none.qcow2"))
    for own in (chain.base, chain.tip):
        with pytest.raises(InvalidArgument, match="part of the replica chain"):
            run(chain.apply_delta(own))
    assert wrong_size.exists() and not_qcow2.exists() and foreign.exists()
    assert not (chain.dir / PENDING).exists()
    run(chain.verify())


def test_points_keep_their_point_in_time_content(chain: ReplicaChain, primary: Primary) -> None:
    snaps = with_points(chain, primary, 1)
    frozen = digest(chain.rp_path(1))
    snaps |= with_points_more(chain, primary, start=2, stop=3)
    assert [p.id for p in chain.points()] == [1, 2, 3]
    for point_id, snap in snaps.items():
        assert same(chain.rp_path(point_id), snap), f"rp-{point_id}"
        assert not same(chain.rp_path(point_id), primary.src)
    assert same(primary.src, chain.tip)
    assert digest(chain.rp_path(1)) == frozen  # a backing file is never written
    assert backing_name(chain.rp_path(1)) == "base.qcow2"
    assert backing_name(chain.rp_path(3)) == "rp-2.qcow2"
    assert backing_name(chain.tip) == "rp-3.qcow2"
    point = chain.points()[0]
    assert point.path == chain.rp_path(1) and point.size_bytes > 0 and point.mtime > 0
    run(chain.verify())


def with_points_more(
    chain: ReplicaChain, primary: Primary, start: int, stop: int
) -> dict[int, Path]:
    """Freeze points start..stop, each after the cycle already in tip, then apply one more."""
    snaps = {}
    for point_id in range(start, stop + 1):
        run(chain.freeze_recovery_point(point_id))
        snaps[point_id] = primary.snapshot(str(point_id))
        run(chain.apply_delta(primary.cycle(CYCLES[point_id])))
    return snaps


def test_freeze_is_idempotent_and_ids_only_grow(chain: ReplicaChain, primary: Primary) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    rp = run(chain.freeze_recovery_point(5))
    run(chain.apply_delta(primary.cycle(CYCLES[1])))
    tip_before = digest(chain.tip)
    assert run(chain.freeze_recovery_point(5)) == rp
    assert digest(chain.tip) == tip_before
    assert [p.id for p in chain.points()] == [5]
    with pytest.raises(InvalidArgument):
        run(chain.freeze_recovery_point(3))
    with pytest.raises(InvalidArgument):
        run(chain.freeze_recovery_point(0))
    run(chain.freeze_recovery_point(9))
    assert [p.id for p in chain.points()] == [5, 9]
    assert same(primary.src, chain.tip) and same(primary.src, chain.rp_path(9))
    run(chain.verify())


def test_pruning_the_oldest_keeps_remaining_content(chain: ReplicaChain, primary: Primary) -> None:
    snaps = with_points(chain, primary, 4)
    assert run(chain.prune_oldest()) and run(chain.prune_oldest())
    assert [p.id for p in chain.points()] == [3, 4]
    assert not chain.rp_path(1).exists() and not chain.rp_path(2).exists()
    assert backing_name(chain.rp_path(3)) == "base.qcow2"
    assert same(chain.rp_path(3), snaps[3]) and same(chain.rp_path(4), snaps[4])
    assert same(primary.src, chain.tip)
    assert same(chain.base, snaps[2])  # base now holds what point 2 showed
    run(chain.verify())
    assert run(chain.prune_oldest()) and run(chain.prune_oldest())
    assert backing_name(chain.tip) == "base.qcow2"
    assert same(primary.src, chain.tip)
    assert run(chain.prune_oldest()) is False
    run(chain.verify())


def test_prune_refuses_while_any_point_is_pinned(
    chain: ReplicaChain, primary: Primary, tmp_path: Path
) -> None:
    snaps = with_points(chain, primary, 2)
    overlay = run(chain.overlay_for(1, tmp_path / "failover" / "disk0.qcow2"))
    files = {p.name: digest(p) for p in chain.dir.iterdir()}
    assert run(chain.prune_oldest(pinned={1})) is False
    assert run(chain.prune_oldest(pinned={2})) is False
    assert {p.name: digest(p) for p in chain.dir.iterdir()} == files
    assert same(overlay, snaps[1])
    qio(overlay, "write -P 0x99 0 1M")  # the failover VM writes; the point does not change
    assert same(chain.rp_path(1), snaps[1])
    overlay.unlink()  # the failover ended
    assert run(chain.prune_oldest(pinned={7})) is True  # a pin elsewhere does not count
    assert same(chain.rp_path(2), snaps[2]) and same(primary.src, chain.tip)
    run(chain.verify())


def test_overlay_for_latest_and_errors(
    chain: ReplicaChain, primary: Primary, tmp_path: Path
) -> None:
    with pytest.raises(NotFound):
        run(chain.overlay_for("latest", tmp_path / "ov.qcow2"))
    snaps = with_points(chain, primary, 2)
    overlay = run(chain.overlay_for("latest", tmp_path / "ov.qcow2"))
    assert run(qemu_img.info(overlay))["full-backing-filename"] == str(chain.rp_path(2))
    assert same(overlay, snaps[2])
    with pytest.raises(InvalidState):
        run(chain.overlay_for(1, overlay))
    with pytest.raises(NotFound):
        run(chain.overlay_for(3, tmp_path / "ov3.qcow2"))
    with pytest.raises(InvalidArgument):
        run(chain.overlay_for(1, chain.dir / "rp-7.qcow2"))
    assert not (tmp_path / "ov3.qcow2").exists()


@pytest.mark.parametrize("finish", ["recover", "freeze again"])
def test_half_done_freeze_is_finished(chain: ReplicaChain, primary: Primary, finish: str) -> None:
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    chain.tip.rename(chain.rp_path(1))  # died between the rename and the new tip
    (chain.dir / "tip.qcow2.tmp").write_bytes(b"half")
    with pytest.raises(IntegrityError):
        run(chain.verify())
    if finish == "recover":
        done = run(chain.recover())
        assert done == ["removed leftover tip.qcow2.tmp", "created tip.qcow2 on rp-1.qcow2"]
    else:
        assert run(chain.freeze_recovery_point(1)) == chain.rp_path(1)
    assert backing_name(chain.tip) == "rp-1.qcow2"
    assert reads(chain.tip, 0x11, "0", "256k")
    run(chain.apply_delta(primary.cycle(CYCLES[1])))
    assert same(primary.src, chain.tip)
    assert not (chain.dir / "tip.qcow2.tmp").exists()
    run(chain.verify())


def test_half_done_create_is_finished(tmp_path: Path) -> None:
    chain = ReplicaChain(tmp_path / "disk")
    with pytest.raises(NotFound):
        run(chain.recover())
    chain.dir.mkdir()
    run(qemu_img.create(chain.base, SIZE))
    assert run(chain.recover()) == ["created tip.qcow2 on base.qcow2"]
    run(chain.verify())
    assert run(chain.recover()) == []


def test_prune_cut_off_after_commit_needs_nothing(chain: ReplicaChain, primary: Primary) -> None:
    snaps = with_points(chain, primary, 2)
    run(qemu_img.commit(chain.rp_path(1)))  # died before the rebase
    run(chain.verify())
    assert run(chain.recover()) == []
    assert same(chain.rp_path(1), snaps[1]) and same(chain.rp_path(2), snaps[2])
    assert same(primary.src, chain.tip)
    assert run(chain.prune_oldest()) is True  # the repeated commit is harmless
    assert same(chain.rp_path(2), snaps[2]) and same(primary.src, chain.tip)
    run(chain.verify())


@pytest.mark.parametrize("finish", ["recover", "prune again"])
def test_prune_cut_off_after_rebase_is_finished(
    chain: ReplicaChain, primary: Primary, finish: str
) -> None:
    snaps = with_points(chain, primary, 2)
    run(qemu_img.commit(chain.rp_path(1)))
    run(qemu_img.rebase_unsafe(chain.rp_path(2), "base.qcow2"))  # died before the delete
    with pytest.raises(IntegrityError, match="chain"):
        run(chain.verify())
    if finish == "recover":
        assert run(chain.recover(pinned={1})) == []  # never deletes a pinned point
        assert run(chain.recover()) == ["removed rp-1.qcow2, already folded into base.qcow2"]
    else:
        assert run(chain.prune_oldest()) is True
    assert [p.id for p in chain.points()] == [2]
    assert same(chain.rp_path(2), snaps[2]) and same(primary.src, chain.tip)
    run(chain.verify())


def test_prune_of_the_last_point_cut_off_after_rebase(
    chain: ReplicaChain, primary: Primary
) -> None:
    with_points(chain, primary, 1)
    run(qemu_img.commit(chain.rp_path(1)))
    run(qemu_img.rebase_unsafe(chain.tip, "base.qcow2"))
    assert run(chain.recover()) == ["removed rp-1.qcow2, already folded into base.qcow2"]
    assert same(primary.src, chain.tip)
    run(chain.verify())


def test_verify_detects_a_broken_chain(chain: ReplicaChain, primary: Primary) -> None:
    with_points(chain, primary, 2)
    run(chain.verify())
    run(qemu_img.rebase_unsafe(chain.tip, "rp-1.qcow2"))  # skips rp-2
    with pytest.raises(IntegrityError) as err:
        run(chain.verify())
    assert "base.qcow2 ← rp-1.qcow2 ← tip.qcow2" in str(err.value)
    assert "base.qcow2 ← rp-1.qcow2 ← rp-2.qcow2 ← tip.qcow2" in str(err.value)
    run(qemu_img.rebase_unsafe(chain.tip, "rp-2.qcow2"))
    run(chain.verify())
    chain.rp_path(1).rename(chain.dir / "lost.qcow2")
    with pytest.raises(IntegrityError, match="cannot be opened"):
        run(chain.verify())


def test_verify_detects_a_corrupt_image(chain: ReplicaChain, primary: Primary) -> None:
    with_points(chain, primary, 1)
    path = chain.rp_path(1)
    with open(path, "r+b") as f:  # point the first data cluster at the L1 table
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | l1))
    with pytest.raises(IntegrityError, match=r"rp-1\.qcow2 .*fails qemu-img check"):
        run(chain.verify())


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1, 0.25])
def test_apply_killed_at_any_moment_then_rerun(tmp_path: Path, delay: float) -> None:
    """Cancelling kills qemu-img as a crash would; wherever it lands, a re-run completes."""
    size = 64 << 20
    chain = run(ReplicaChain.create(tmp_path / "disk", size))
    src, delta = tmp_path / "src.qcow2", tmp_path / "delta.qcow2"
    for image in (src, delta):
        run(qemu_img.create(image, size))
        qio(image, "write -P 0x5a 0 48M", "write -z 8M 1M")

    async def interrupted() -> None:
        task = asyncio.create_task(chain.apply_delta(delta))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(interrupted())
    assert not [p for p in chain.dir.iterdir() if p.name.endswith(".tmp")]
    run(chain.recover())
    run(chain.apply_delta(delta, missing_ok=True))
    assert same(src, chain.tip)
    run(chain.verify())


def test_prune_under_a_running_overlay_fails_cleanly(
    chain: ReplicaChain, primary: Primary, tmp_path: Path
) -> None:
    """Why any pin blocks pruning: the commit writes base, which a running overlay locks."""
    snaps = with_points(chain, primary, 2)
    overlay = run(chain.overlay_for(2, tmp_path / "ov.qcow2"))
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(overlay)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        inode = f":{overlay.stat().st_ino} "
        deadline = time.monotonic() + 10
        while not any(inode in line for line in Path("/proc/locks").read_text().splitlines()):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(InvalidState, match="in use"):
            run(chain.prune_oldest())
    finally:
        holder.kill()
        holder.wait()
    assert [p.id for p in chain.points()] == [1, 2]
    assert same(chain.rp_path(1), snaps[1]) and same(overlay, snaps[2])
    run(chain.verify())


def test_disk_full_mid_apply_is_finished_once_space_is_freed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "2M") as mnt:
        chain = run(ReplicaChain.create(mnt / "disk", SIZE))
        src, delta = tmp_path / "src.qcow2", tmp_path / "delta.qcow2"
        for image in (src, delta):
            run(qemu_img.create(image, SIZE))
            qio(image, "write -P 0x66 0 3M")
        with pytest.raises(StorageError, match=r"^disk full: "):
            run(chain.apply_delta(delta))
        assert delta.exists()
        subprocess.run(["mount", "-o", "remount,size=16M", str(mnt)], check=True)
        assert run(chain.recover()) == [f"finished applying {delta}"]
        assert same(src, chain.tip) and not delta.exists()
        run(chain.verify())


def test_a_delta_costs_two_qemu_img_processes(
    chain: ReplicaChain, primary: Primary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receiving and applying one delta to one disk: check of the delta (check_incoming), one
    commit into tip (apply). The headers of the delta and of tip are read in Python, twice, and
    the commit names tip as the delta's backing itself: six processes before (issue 14)."""
    ran: list[str] = []
    real = qemu_img._run

    async def counted(cmd: str, subject: str, args: Any, ok: Any = (0,)) -> tuple[int, str]:
        ran.append(f"{cmd} {Path(subject).name}")
        return await real(cmd, subject, args, ok)

    delta = primary.cycle(CYCLES[0])
    monkeypatch.setattr(qemu_img, "_run", counted)
    run(chain.check_incoming(delta))
    assert run(chain.apply_delta(delta))
    assert ran == [f"check {delta.name}", f"commit {delta.name}"]
    assert same(chain.tip, primary.src)


def test_commit_into_leaves_the_delta_untouched_and_ignores_its_header_backing(
    chain: ReplicaChain, primary: Primary, tmp_path: Path
) -> None:
    """The apply's one qemu-img: tip named as the delta's backing at open time, so the delta's
    bytes stay as they are (zero clusters arrive as zero clusters), and a backing pointer an
    older version wrote into it is ignored."""
    run(chain.apply_delta(primary.cycle(CYCLES[0])))
    delta = primary.cycle(CYCLES[1])
    before = digest(delta)
    run(qemu_img.commit_into(delta, chain.tip))
    assert digest(delta) == before and backing_name(delta) is None
    assert same(primary.src, chain.tip)
    zero = next(e for e in run(qemu_img.map(chain.tip)) if e.start == 1 << 20)
    assert zero.depth == 0 and zero.zero and not zero.data
    stale = primary.cycle(CYCLES[2])
    run(qemu_img.rebase_unsafe(stale, chain.base))  # a header naming another image
    run(qemu_img.commit_into(stale, chain.tip))
    assert same(primary.src, chain.tip)
    run(chain.verify())
