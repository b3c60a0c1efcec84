"""The short crash-torture run: the harness of scripts/torture.py (tests/torture.py and
tests/torture_check.py) with a fixed seed and six kills. Seed 2104 draws every phase (test
failover, initial copy, resync, failover, cycle, planned failover and fail-back, in that order)
and every victim (either agent, a child, the VM's QEMU) in its first six rounds; its two child
rounds want a qemu-storage-daemon (in the initial copy) and a qemu-img (in the planned round
trip). A child kill that finds no helper of its kind running draws another round. After each
recovered round one recovery point is opened, as at the end. About 2-5 minutes on an idle
machine; 7.4 minutes at a load average of 5-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.torture import KINDS, helpers_of
from tests.torture_check import run

SEED = 2104
KILLS = 6


@pytest.mark.timeout(900)  # about 2-5 minutes here; a recovery may take up to its 240 s
def test_seeded_kills_recover_and_lose_nothing() -> None:
    base = Path(tempfile.mkdtemp(prefix="vmrt", dir="/tmp"))
    results = base.with_name(base.name + ".json")
    try:
        data = run(base, SEED, KILLS, results, recovery_timeout=240.0)
    finally:
        text = results.read_text() if results.exists() else ""
        results.unlink(missing_ok=True)
    rounds = data["rounds"]
    failed = [r for r in rounds if r["outcome"] not in ("recovered", "no-target")]
    assert not failed, json.dumps(failed, indent=1)
    assert data["kills"] == KILLS and data["recovered"] == KILLS, text
    landed = [r for r in rounds if r["outcome"] != "no-target"]
    assert all(r["kind"] in KINDS for r in landed), text
    assert data["point_checks"] and all(c["ok"] for c in data["point_checks"]), text
    final = data["final"]
    assert final["ok"], final.get("problems")
    assert final["replica_equals_primary"]
    assert final["points"][-1]["id"] == "Latest" and len(final["points"]) >= 3, final["points"]
    assert final["points"][-1]["records"] == final["primary"]["records"] > 0
    assert not data["lost"]


def test_the_harness_sees_storage_daemons_and_qemu_img(tmp_path: Path) -> None:
    """The reproduction of a harness defect: it looked for comm ``qemu-storage-d`` (14 bytes),
    the kernel keeps 15 (``qemu-storage-da``), so it never saw, and never killed, a storage
    daemon. A real daemon and a real qemu-img, children of this process, must both be found."""
    sock = tmp_path / "m.sock"
    daemon = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                               f"socket,id=m,path={sock},server=on,wait=off", "--monitor",
                               "chardev=m"])  # fmt: skip
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "x.qcow2"), "1M"],
                   check=True)  # fmt: skip
    # A qemu-img that lives a while: many small reads of a tiny image.
    image = subprocess.Popen(["qemu-img", "bench", "-c", "100000000", "-s", "512",
                              str(tmp_path / "x.qcow2")], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        kinds = {(pid, kind) for pid, kind, _ in helpers_of({os.getpid(): "test"})}
        assert (daemon.pid, "qemu-storage-daemon") in kinds, kinds
        assert (image.pid, "qemu-img") in kinds, kinds
    finally:
        for proc in (daemon, image):
            proc.kill()
            proc.wait()
