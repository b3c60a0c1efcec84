"""The short crash-torture run: the harness of scripts/torture.py (tests/torture.py and
tests/torture_check.py) with a fixed seed and six kills. Seed 815 draws every phase (cycle, test
failover, failover, resync, planned failover and fail-back) and every victim (either agent, an
agent's qemu-img or qemu-storage-daemon child, the VM's QEMU) in its first six rounds; a child
kill that finds no child running draws another round."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.torture_check import run

SEED = 815
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
    final = data["final"]
    assert final["ok"], final.get("problems")
    assert final["replica_equals_primary"]
    assert final["points"][-1]["id"] == "Latest" and len(final["points"]) >= 3, final["points"]
    assert final["points"][-1]["records"] == final["primary"]["records"] > 0
    assert not data["lost"]
