"""The end of a torture run (tests/torture.py): stop the guest cleanly, replicate the last of it,
and check every recovery point through the product's own test failover, then the run driver
both scripts/torture.py and tests/integration/test_torture.py call."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests import guest
from tests.integration.replication_env import PRIMARY, REPLICA, same_content, wait_for
from tests.localcluster import Cluster
from tests.torture import PHASES, VM, Torture, _now


def check_point(t: Torture, point: str) -> tuple[dict[str, Any], guest.RecordReport]:
    """Open ``point`` through a test failover on the replica and check its records and ext4."""
    t.cli("failover", "start", VM, "--as-test", "--recovery-point", point, host=REPLICA)
    try:
        test_vm = t.json("vm", "get", f"{VM} - Test", host=REPLICA)[0]
        report = guest.verify_records(Path(str(test_vm["disks"][0])))
    finally:
        t.cli("failover", "stop", VM, host=REPLICA)
    row = {"id": point, "records": report.count, "fsck_clean": report.fsck_clean,
           "errors": list(report.errors), "torn_tail": report.torn_tail}  # fmt: skip
    return row, report


def check_a_point(t: Torture, number: int) -> None:
    """Between rounds: open the oldest point not opened yet, before a cycle prunes it."""
    listed = t.json("recovery-point", "list", VM, host=REPLICA)
    keys = {str(p["id"]): f"{p['id']}@{p['creation_time']}" for p in listed if p["id"] != "Latest"}
    t.points_made.update(keys.values())
    new = [(point, key) for point, key in keys.items() if key not in t.checked]
    if not new:
        return
    point, key = new[0]  # the list is oldest first
    t.checked.add(key)
    try:
        row, report = check_point(t, point)
    except RuntimeError as e:  # pruned between the list and the test failover: not a loss
        if "not found" in str(e).lower() or "no recovery point" in str(e).lower():
            t.log(f"    point {point} went before it was opened: {e}")
            return
        row = {"id": point, "records": 0, "fsck_clean": False, "errors": [str(e)[-300:]]}
        report = None
    row |= {"round": number, "created": key.partition("@")[2], "at": _now(),
            "ok": report is not None and report.ok}  # fmt: skip
    t.point_checks.append(row)
    t.log(f"    point {point} opened: {row['records']} records, "
          f"{'ok' if row['ok'] else 'FAILED: ' + '; '.join(row['errors'])}")  # fmt: skip


def final_check(t: Torture) -> dict[str, Any]:
    """Every point's records and file system, and the latest against the primary."""
    # A guest started by the last recovery may still be booting: a power button pressed before
    # its init listens is lost (QEMU's file console starts empty at each boot).
    wait_for(lambda: "vmr: ready" in t.serial(), 120, "the guest up")
    t.cli("vm", "stop", VM, timeout=180)  # the power button: the guest unmounts and powers off
    wait_for(lambda: t.json("vm", "get", VM)[0]["state"] == "Off", 120, "the guest off")
    # After a planned failover and fail-back the disk is a chain in vmhost2's replica storage.
    disk = Path(str(t.json("vm", "get", VM)[0]["disks"][0]))
    written = guest.verify_records(disk)
    t.cli("replication", "sync", VM, timeout=300)
    # The replica VM's disks are its chains' tips (a fail-back leaves them under rev-*/).
    tip = Path(str(t.json("vm", "get", VM, host=REPLICA)[0]["disks"][0]))
    equal = same_content(disk, tip)
    out: dict[str, Any] = {
        "primary": {"records": written.count, "fsck_clean": written.fsck_clean,
                    "errors": list(written.errors), "details": written.details},
        "replica_equals_primary": equal,
        "points": [],
    }  # fmt: skip
    problems = []
    if not written.fsck_clean or written.errors:
        problems.append(f"the primary's own disk: {written.details}")
    if not equal:
        problems.append("the replica's latest differs from the primary (qemu-img compare)")
    previous = 0
    for point in t.points():
        row, report = check_point(t, point)
        out["points"].append(row)
        if not report.ok:
            problems.append(f"point {point}: {report.details}")
        if report.count < previous:
            problems.append(f"point {point} holds fewer records ({report.count}) than the one "
                            f"before it ({previous})")  # fmt: skip
        previous = report.count
        if point == "Latest" and report.count != written.count:
            problems.append(f"Latest holds {report.count} records, the primary {written.count}")
    if not out["points"]:
        problems.append("no recovery point on the replica")
    out["problems"] = problems
    out["ok"] = not problems
    return out


def summary(torture: Torture, started: str, final: dict[str, Any], asked: int) -> dict[str, Any]:
    kills = [k for k in torture.kills if k.outcome != "no-target"]
    failed = [k for k in kills if k.outcome != "recovered"]
    bad_points = [c for c in torture.point_checks if not c["ok"]]
    return {
        "seed": torture.seed,
        "started": started,
        "finished": _now(),
        "kills_asked": asked,
        "phases": list(torture.phases),
        "kills": len(kills),
        "recovered": len(kills) - len(failed),
        "rounds": [asdict(k) for k in torture.kills],
        "points_made": len(torture.points_made),
        "point_checks": torture.point_checks,
        "final": final,
        "lost": bool(failed or bad_points) or not final.get("ok", False),
    }


def run(base: Path, seed: int, kills: int, results: Path | None = None, *,
        deadline: float | None = None, recovery_timeout: float = 300.0,
        phases: tuple[str, ...] = PHASES, check_points: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Set up two agents and the guest in ``base``, kill until ``kills`` kills landed (or the
    monotonic ``deadline`` passed), check, and return (and write to ``results``) the summary."""
    started = _now()
    cluster = Cluster.create(names=(REPLICA, PRIMARY), base=base)
    torture = Torture(cluster, seed, recovery_timeout=recovery_timeout, phases=phases, log=log)
    final: dict[str, Any] = {}

    def save() -> dict[str, Any]:
        data = summary(torture, started, final, kills)
        if results is not None:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(data, indent=2) + "\n")
        return data

    try:
        torture.setup()
        number = 0
        while sum(k.outcome != "no-target" for k in torture.kills) < kills:
            if deadline is not None and time.monotonic() > deadline:
                log(f"deadline reached after {len(torture.kills)} rounds")
                break
            number += 1
            if torture.round(number).outcome == "recovered" and check_points:
                check_a_point(torture, number)
            save()
        try:
            final = final_check(torture)
        except Exception as e:  # recorded as a loss: the check itself could not finish
            final = {"ok": False, "problems": [f"final check failed: {e}"],
                     "logs": torture.log_tails()}  # fmt: skip
        final["records_seen_on_console"] = torture.records_seen()
        return save()
    finally:
        cluster.close()
