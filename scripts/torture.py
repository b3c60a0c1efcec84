"""The long crash-torture run of the reliability issue (the loop is tests/torture.py, its end
tests/torture_check.py; the test suite runs a short one, tests/integration/test_torture.py).

Run from the project root::

    .venv/bin/python scripts/torture.py --seed 1 --kills 100 [--dir D] \\
        [--results bench/results/torture.json] [--minutes M]

Every round's phase, victim and delay come from ``random.Random(seed)``; the results file is
written after every round, so an interrupted run keeps what it did. ``--minutes`` stops starting
rounds after that long (the final checks still run). Exit status 1 on any loss: a kill that did
not recover in time, or a recovery point, or the latest, that fails its checks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.torture import PHASES
from tests.torture_check import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /tmp)")
    parser.add_argument("--results", type=Path, default=Path("bench/results/torture.json"))
    parser.add_argument("--minutes", type=float, help="start no round after this many minutes")
    parser.add_argument("--recovery-timeout", type=float, default=300.0)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="the phases to draw from (default: all; fewer draws differently)")  # fmt: skip
    args = parser.parse_args()
    # SIGTERM (or SIGINT, which a shell's background job ignores) ends the run through run()'s
    # finally, which stops the agents and every QEMU of the run.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    phases = tuple(args.phases.split(","))
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    base = args.dir or Path(tempfile.mkdtemp(prefix="vmr-torture-", dir="/tmp"))
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    data = run(base, args.seed, args.kills, args.results, deadline=deadline,
               recovery_timeout=args.recovery_timeout, phases=phases,
               log=lambda line: print(line, flush=True))  # fmt: skip
    if args.minutes:  # the report shows the command: with its time limit
        data["minutes"] = args.minutes
        args.results.write_text(json.dumps(data, indent=2) + "\n")
    failed = [r for r in data["rounds"] if r["outcome"] not in ("recovered", "no-target")]
    print(f"{data['kills']} kills, {data['recovered']} recovered, {len(failed)} failed; "
          f"final check {'ok' if data['final'].get('ok') else 'FAILED'}: "
          f"{'; '.join(data['final'].get('problems', []))}; results: {args.results}")  # fmt: skip
    return 1 if data["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
