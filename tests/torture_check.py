"""The end of a torture run (tests/torture.py): stop the guest cleanly, replicate the last of it,
and check every recovery point through the product's own test failover, then the run driver
both scripts/torture.py and tests/integration/test_torture.py call."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import guest
from tests.integration.replication_env import PRIMARY, REPLICA, same_content, wait_for
from tests.localcluster import Cluster
from tests.torture import PHASES, VM, Torture, _now, summary


def final_check(t: Torture) -> dict[str, Any]:
    """Every point's records and file system, and the latest against the primary."""
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
        t.cli("failover", "start", VM, "--as-test", "--recovery-point", point, host=REPLICA)
        try:
            test_vm = t.json("vm", "get", f"{VM} - Test", host=REPLICA)[0]
            report = guest.verify_records(Path(str(test_vm["disks"][0])))
        finally:
            t.cli("failover", "stop", VM, host=REPLICA)
        row = {"id": point, "records": report.count, "fsck_clean": report.fsck_clean,
               "errors": list(report.errors), "torn_tail": report.torn_tail}  # fmt: skip
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


def run(base: Path, seed: int, kills: int, results: Path | None = None, *,
        deadline: float | None = None, recovery_timeout: float = 300.0,
        phases: tuple[str, ...] = PHASES,
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
            torture.round(number)
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
