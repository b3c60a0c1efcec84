"""A resynchronization's overlay dropped while an apply into it was half done (its delta then
deleted with the journal entry, engine/replica/resync.py ``drop``): the chain forgets that
apply with the overlay, so the next delta applies into ``tip`` at once. Real qemu-img."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from vmreplica._internal.drivers.qemu.chain import PENDING, ReplicaChain

SIZE = 16 << 20


def delta(path: Path, pattern: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 1M 64k", str(path)],
                   check=True, capture_output=True)  # fmt: skip
    return path


def reads(image: Path, pattern: int) -> bool:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {pattern:#x} 1M 64k",
                           str(image)], capture_output=True, text=True)  # fmt: skip
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def test_a_dropped_overlay_takes_its_half_done_apply_with_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        chain = await ReplicaChain.create(tmp_path / "disk0", SIZE)
        await chain.begin_resync()
        staged = tmp_path / "staging" / "7"
        staged.mkdir(parents=True)
        half = delta(staged / "disk0.qcow2", 0x5A)
        # An apply into the overlay cut off: the marker names the delta; then the resync is
        # dropped, and its journaled delta deleted before the overlay.
        (chain.dir / PENDING).write_text(f"{half}\n")
        half.unlink()
        await chain.end_resync(commit=False)
        assert not chain.resync.exists() and not (chain.dir / PENDING).exists()
        assert await chain.apply_delta(delta(tmp_path / "next.qcow2", 0x5B))
        assert reads(chain.tip, 0x5B)
        await chain.verify()

    asyncio.run(scenario())
